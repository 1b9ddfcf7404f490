"""Runs of the main job over variants x seeds from one shared start, and their statistics: the
machinery of ``tools/compare_algos.py`` (report on the test split) and ``tools/sweep.py`` (choose
settings on the validation split).

Every run is one ``python -m megatron_sdar.train`` process in ``<out>/<variant>/seed<S>``. A run
directory is reused only when its ``config.json`` is the configuration the run would have now
(the same composition of the same overrides): a finished run is kept, an unfinished one resumes
from its newest checkpoint, and one made with another configuration (other overrides, other
defaults, older code) is refused with the keys that differ, never silently mixed into a table.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EVAL_KEYS = ("eval/success_rate", "eval/num_tasks", "eval/success_rate_ci_low", "eval/success_rate_ci_high",
             "eval/first_choice_correct")
RANDOM_SKILLS = "env.retrieval=random"  # the override that makes a variant its random-skill control
# keys that may differ between invocations of the same run (how it was started, not what it computes)
_INVOCATION_KEYS = ("trainer.resume",)


class StaleRunError(RuntimeError):
    """A run directory holds a run of another configuration."""


class RunFailedError(RuntimeError):
    """A run of the main job exited with an error."""


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"sdar:algo.estimator=full,env.retrieval=random"`` -> ``("sdar", ["algo.estimator=full", ...])``."""
    preset, _, rest = spec.partition(":")
    overrides = [o for o in rest.split(",") if o] if rest else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"variant {spec!r}: overrides must be key=value, got {bad}")
    return preset, overrides


def variant_dir_name(spec: str) -> str:
    """A directory name for a variant that Hydra accepts in ``trainer.output_dir=`` (no ``=``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", spec.replace(":", "__").replace(",", "__").replace("=", "-"))


def eval_rows(metrics_jsonl: Path) -> list[dict]:
    """A run's evaluation rows: ``step``, ``eval/success_rate`` and its interval, the share of first
    decisive choices that were right (where the environment judges one) and (step 0) the greedy and
    with-skills success and first choice."""
    from megatron_sdar.utils.logging import read_metrics

    keep = (*EVAL_KEYS, "eval/with_skills/success_rate", "eval/greedy/success_rate",
            "eval/with_skills/first_choice_correct")
    return [{"step": r["step"], **{k: r[k] for k in keep if k in r}}
            for r in read_metrics(metrics_jsonl) if "eval/success_rate" in r]


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, expected: dict) -> list[str]:
    """``key: saved -> expected`` for every configuration key that differs (invocation keys aside):
    changed values first, then keys only one side has."""
    a, b = _flatten(saved), _flatten(expected)
    keys = (set(a) | set(b)) - set(_INVOCATION_KEYS)
    changed = sorted(k for k in keys & set(a) & set(b) if a[k] != b[k])
    one_sided = sorted(k for k in keys if (k in a) != (k in b))
    return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in changed + one_sided]


@dataclass
class MainJobRun:
    """One run of the main job: its directory and Hydra overrides."""

    run_dir: Path
    overrides: list[str]

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={self.run_dir}", *self.overrides]

    def expected_config(self) -> dict:
        """The configuration this run would have (``trainer.resume`` is an invocation key that
        :func:`config_differences` ignores)."""
        from megatron_sdar.config.schema import compose_run, config_dict

        return config_dict(compose_run(self.command[3:]))

    def finished(self) -> bool:
        from megatron_sdar.utils.logging import read_metrics

        config, metrics = self.run_dir / "config.json", self.run_dir / "metrics.jsonl"
        if not config.is_file() or not metrics.is_file():
            return False
        max_steps = json.loads(config.read_text())["trainer"]["max_steps"]
        return any(r.get("step") == max_steps for r in read_metrics(metrics))

    def check_reusable(self) -> bool:
        """Whether the directory holds this run already (finished or not); :class:`StaleRunError`
        when it holds a run of another configuration."""
        saved = self.run_dir / "config.json"
        if not saved.is_file():
            return False
        differences = config_differences(json.loads(saved.read_text()), self.expected_config())
        if differences:
            shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} keys)" if len(differences) > 6 else "")
            raise StaleRunError(f"{self.run_dir} holds a run of another configuration ({shown}); delete it or "
                                f"choose another --out")
        return True

    def ensure(self, log=print) -> None:
        """Run it unless it is finished; an unfinished run of the same configuration resumes."""
        command = self.command
        if self.check_reusable():
            if self.finished():
                log(f"{self.run_dir} is complete, kept")
                return
            command = [*command, "trainer.resume=auto"]
        log(" ".join(command[1:]))
        if subprocess.run(command, env=dict(os.environ)).returncode != 0:
            raise RunFailedError(f"run failed: {' '.join(command[1:])}")


def start_rows(init: Path, split: str) -> list[dict]:
    """The step-0 evaluation rows of the run that wrote ``init`` when it is a run's ``sft_model/``
    evaluated on ``split``."""
    run_dir = init.parent
    config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
    if init.name != "sft_model" or not metrics.is_file() or not config.is_file():
        return []
    if json.loads(config.read_text())["trainer"].get("eval_split", "test") != split:
        return []
    return [r for r in eval_rows(metrics) if r["step"] == 0]


def shared_start(out: Path, init: str | None, sft_seed: int, overrides: list[str], split: str,
                 log=print) -> tuple[str, list[dict]]:
    """The HF directory every run starts from and its step-0 evaluation rows: ``init``, or the
    SFT-only run ``<out>/sft`` (made here, evaluated on ``split``). An ``init`` whose run was not
    evaluated on ``split`` is evaluated there by ``<out>/start`` (no training): every comparison has
    its start, so that a run ending below it is counted."""
    if init is None:
        sft = MainJobRun(out / "sft", ["trainer.max_steps=0", "trainer.plot=false", f"trainer.seed={sft_seed}",
                                       f"trainer.eval_split={split}", *overrides])
        sft.ensure(log)
        init = str(out / "sft" / "sft_model")
    rows = start_rows(Path(init), split)
    if rows:
        log(f"step 0: the evaluation of {Path(init).parent} (the run that wrote {init})")
        return init, rows
    start = MainJobRun(out / "start", ["trainer.max_steps=0", "trainer.sft_steps=0", f"model.hf_path={init}",
                                       "trainer.plot=false", "trainer.export_hf=false", f"trainer.seed={sft_seed}",
                                       f"trainer.eval_split={split}", *overrides])
    log(f"step 0: evaluating {init} on the {split} split ({start.run_dir})")
    start.ensure(log)
    return init, [r for r in eval_rows(start.run_dir / "metrics.jsonl") if r["step"] == 0]


def variant_run(out: Path, spec: str, seed: int, init: str, overrides: list[str], split: str) -> MainJobRun:
    """The run of variant ``spec`` (``preset[:key=value,...]``) with ``trainer.seed=seed`` from ``init``."""
    preset, variant_overrides = parse_variant(spec)
    return MainJobRun(out / variant_dir_name(spec) / f"seed{seed}",
                      [f"algo={preset}", f"model.hf_path={init}", "trainer.sft_steps=0",
                       "trainer.eval_before_rl=false", "trainer.export_hf=false", "trainer.plot=false",
                       f"trainer.seed={seed}", f"trainer.eval_split={split}", *overrides, *variant_overrides])


def run_variants(out: Path, specs: list[str], seeds: list[int], init: str, overrides: list[str], split: str,
                 log=print) -> dict[str, dict[str, list[dict]]]:
    """Every variant x seed from ``init`` (run, resumed or kept): variant -> seed (a string) -> the
    run's evaluation rows; the last row also holds ``collapse_warnings``, the steps at which the run
    warned that its policy was collapsing (:func:`~megatron_sdar.trainer.loop.collapse_warning`)."""
    results: dict[str, dict[str, list[dict]]] = {}
    total, done = len(specs) * len(seeds), 0
    for spec in specs:
        results[spec] = {}
        for seed in seeds:
            done += 1
            log(f"run {done}/{total}: {spec} seed {seed}")
            run = variant_run(out, spec, seed, init, overrides, split)
            run.ensure(log)
            rows = eval_rows(run.run_dir / "metrics.jsonl")
            if rows:
                rows[-1]["collapse_warnings"] = collapse_steps(run.run_dir / "metrics.jsonl")
            results[spec][str(seed)] = rows
    return results


def collapse_steps(metrics_jsonl: Path) -> list[int]:
    """The steps at which a run logged the collapse warning."""
    from megatron_sdar.trainer.loop import collapse_warning
    from megatron_sdar.utils.logging import read_metrics

    return [r["step"] for r in read_metrics(metrics_jsonl) if collapse_warning(r) is not None]


def control_of(spec: str, specs) -> str | None:
    """The random-skill control of variant ``spec`` among ``specs``: the same variant with
    ``env.retrieval=random`` added (None when there is none, or ``spec`` is a control)."""
    preset, overrides = parse_variant(spec)
    if RANDOM_SKILLS in overrides:
        return None
    wanted = sorted([*overrides, RANDOM_SKILLS])
    return next((other for other in specs if parse_variant(other)[0] == preset
                 and sorted(parse_variant(other)[1]) == wanted), None)


def exit_code_of_errors(tool: str, body) -> int:
    """``body()``'s exit code, or one line on stderr and 2 for a configuration error or a stale run
    directory (nothing was run), 1 for a run that failed."""
    from megatron_sdar.config.schema import ConfigError

    try:
        return body()
    except (StaleRunError, ConfigError) as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 1


def final_success(rows: list[dict]) -> float | None:
    """Held-out success at a run's last evaluated step."""
    return max(rows, key=lambda r: r["step"])["eval/success_rate"] if rows else None


def summarize(summary: dict[str, dict[str, list[dict]]], baseline: str, metric: str = "eval/success_rate") -> str:
    """The markdown table of a comparison on ``metric`` (held-out success, or
    ``eval/first_choice_correct``): per variant the mean +- 95% t-interval over seeds at each
    evaluated step, then at each step after the start the difference from ``baseline`` paired by
    seed, and from the variant's random-skill control where the comparison has one
    (:func:`control_of`), each marked when its interval includes 0; for success also the runs that
    end below their start and the runs that warned of a collapse."""
    from megatron_sdar.utils.stats import mean_ci

    def cell(values: list[float], signed: bool = False, verdict: bool = False) -> str:
        if not values:
            return "-"
        mean, half = mean_ci(values)
        text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
        if half != half:
            return text
        return text + f" ± {half:.3f}" + (" (inside the noise)" if verdict and abs(mean) <= half else "")

    def values(runs: dict[str, list[dict]]) -> dict[str, dict[int, float]]:
        return {seed: {r["step"]: r[metric] for r in rows if metric in r} for seed, rows in runs.items()}

    def paired(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], step: int) -> list[float]:
        return [v[step] - b[s][step] for s, v in a.items() if step in v and step in b.get(s, {})]

    steps = sorted({row["step"] for runs in summary.values() for rows in runs.values() for row in rows if metric in row})
    later = [s for s in steps if s > 0]
    controls = {v: control_of(v, summary) for v in summary}
    success = metric == "eval/success_rate"
    head = ["variant", "seeds", *[f"step {s}" for s in steps], *[f"minus {baseline} at step {s}" for s in later]]
    if any(controls.values()):
        head += [f"minus its random-skill control at step {s}" for s in later]
    if success:
        head += ["runs ending below their start", "runs that warned of a collapse"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base = values(summary.get(baseline, {}))
    for variant, runs in summary.items():
        by_seed = values(runs)
        cells = [variant, str(len(runs))]
        cells += [cell([v[step] for v in by_seed.values() if step in v]) for step in steps]
        cells += ["-" if variant == baseline else cell(paired(by_seed, base, step), signed=True, verdict=True)
                  for step in later]
        if any(controls.values()):
            control = values(summary[controls[variant]]) if controls[variant] else None
            cells += [cell(paired(by_seed, control, step), signed=True, verdict=True) if control else "-"
                      for step in later]
        if success:
            ends = [(v[min(v)], v[max(v)]) for v in by_seed.values() if v and max(v) > min(v) == 0]
            warned = sum(bool(rows[-1].get("collapse_warnings")) for rows in runs.values() if rows)
            cells += [f"{sum(last < first for first, last in ends)} of {len(ends)}", f"{warned} of {len(runs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    n_tasks = {int(r.get("eval/num_tasks", 0)) for runs in summary.values() for rows in runs.values() for r in rows}
    what = "success" if success else f"`{metric}`"
    lines.append("")
    lines.append(f"Held-out {what} on {', '.join(map(str, sorted(n_tasks)))} tasks per evaluation; mean ± half-width "
                 "of the 95% t-interval over seeds; the differences are paired by seed.")
    return "\n".join(lines) + "\n"
