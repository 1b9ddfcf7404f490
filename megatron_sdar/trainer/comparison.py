"""Runs of the main job over variants x seeds from one shared start, and their statistics: the
machinery of ``tools/compare_algos.py`` (report on the test split) and ``tools/sweep.py`` (choose
settings on the validation split).

Every run is one ``python -m megatron_sdar.train`` process in ``<out>/<variant>/seed<S>``. A run
directory is reused only when its ``config.json`` is the configuration the run would have now
(the same composition of the same overrides): a finished run is kept, an unfinished one resumes
from its newest checkpoint, and one made with another configuration (other overrides, other
defaults, older code) is refused with the keys that differ, never silently mixed into a table.

Everything is checked before anything runs (:meth:`Comparison.check`): the command of every run
composes and validates as the trainer would, no override sets what the comparison sets itself (the
start, the seeds, the split, the SFT, the run directories: :func:`fixed_settings`), and every kept
run directory holds its run. A configuration error is one line and exit code 2, as the trainer's.
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
    """A run of the main job exited with an error; ``returncode`` is its exit code (2: the
    trainer refused its configuration)."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


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

    def configuration(self, start_pending: str | None = None):
        """The validated :class:`~megatron_sdar.config.schema.RunConfig` this run is launched with
        (one :class:`~megatron_sdar.config.schema.ConfigError` line when it is refused).
        ``start_pending``: the shared start's HF directory while it is not made yet; its
        ``model.hf_path=`` override is left out, so the run is composed on the model the start is
        trained from (the start is that model's export: the same architecture)."""
        from megatron_sdar.config.schema import compose_run

        overrides = self.command[3:]
        if start_pending is not None:
            overrides = [o for o in overrides if o != f"model.hf_path={start_pending}"]
        return compose_run(overrides)

    def expected_config(self) -> dict:
        """The configuration this run would have (``trainer.resume`` is an invocation key that
        :func:`config_differences` ignores)."""
        from megatron_sdar.config.schema import config_dict

        return config_dict(self.configuration())

    def finished(self) -> bool:
        from megatron_sdar.utils.logging import read_metrics

        config, metrics = self.run_dir / "config.json", self.run_dir / "metrics.jsonl"
        if not config.is_file() or not metrics.is_file():
            return False
        max_steps = json.loads(config.read_text())["trainer"]["max_steps"]
        return any(r.get("step") == max_steps for r in read_metrics(metrics))

    def check_reusable(self, expected: dict | None = None) -> bool:
        """Whether the directory holds this run already (finished or not); :class:`StaleRunError`
        when it holds a run of another configuration (``expected``: this run's, when composed
        already)."""
        saved = self.run_dir / "config.json"
        if not saved.is_file():
            return False
        differences = config_differences(json.loads(saved.read_text()),
                                         self.expected_config() if expected is None else expected)
        if differences:
            shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} keys)" if len(differences) > 6 else "")
            raise StaleRunError(f"{self.run_dir} holds a run of another configuration ({shown}); delete it or "
                                f"choose another --out")
        return True

    def check(self, start_pending: str | None = None):
        """Before anything runs: this run's command composes and validates
        (:meth:`configuration`), and its directory can take it: a fresh one as the trainer checks
        it, a kept one (finished or to resume) holds this configuration (:class:`StaleRunError`;
        not checked for a run from a start not made yet: its ``config.json`` names that start).
        Returns the configuration."""
        from megatron_sdar.config.schema import check_output_dir, config_dict

        pending = start_pending is not None and f"model.hf_path={start_pending}" in self.overrides
        config = self.configuration(start_pending if pending else None)
        if not (self.run_dir / "config.json").is_file():
            check_output_dir(config)
        elif not pending:
            self.check_reusable(config_dict(config))
        return config

    def ensure(self, log=print) -> None:
        """Run it unless it is finished; an unfinished run of the same configuration resumes."""
        command = self.command
        if self.check_reusable():
            if self.finished():
                log(f"{self.run_dir} is complete, kept")
                return
            command = [*command, "trainer.resume=auto"]
        log(" ".join(command[1:]))
        returncode = subprocess.run(command, env=dict(os.environ)).returncode
        if returncode != 0:
            raise RunFailedError(f"run failed (exit {returncode}): {' '.join(command[1:])}", returncode)


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


def override_key(override: str) -> str:
    """The key a Hydra override sets: ``trainer.seed=3``, ``+trainer.seed=3``, ``~trainer.seed``
    -> ``trainer.seed``; ``algo@pkg=grpo`` -> ``algo``."""
    return override.lstrip("~+").partition("=")[0].partition("@")[0].strip()


def fixed_settings(variants: str, split: str) -> dict[str, str]:
    """The settings a comparison sets for every run itself, each with what sets it instead (a
    ``{value}`` field: the refused override's value). ``variants``: the tool's option that names the
    presets (``--algos {value}``); ``split``: how its evaluation split is chosen."""
    return {
        "algo": f"{variants} names each variant's preset",
        "model.hf_path": "--init {value} is the start every run takes (the model the shared SFT run trains from: "
                         "model=<name> or experiment=<recipe>)",
        "trainer.sft_steps": "--sft-steps {value} sizes the shared SFT run; every variant starts from its model "
                             "and runs no SFT",
        "trainer.seed": "--seeds {value} sets the variants' seeds, --sft-seed {value} the shared SFT run's",
        "trainer.eval_split": split,
        "trainer.output_dir": "--out {value} holds every run (<out>/sft, <out>/<variant>/seed<S>)",
        "trainer.resume": "an unfinished run resumes by itself (trainer.resume=auto), a finished one is kept",
    }


def refuse_fixed(overrides: list[str], fixed: dict[str, str], where: str) -> None:
    """:class:`ConfigError` for the first of ``overrides`` that sets one of the ``fixed`` settings
    (:func:`fixed_settings`); ``where``: whose overrides they are."""
    from megatron_sdar.config.schema import ConfigError

    for override in overrides:
        key = override_key(override)
        if key in fixed:
            value = override.partition("=")[2] or "..."
            raise ConfigError(f"{override} ({where}): the comparison sets {key} itself; "
                              + fixed[key].format(value=value))


@dataclass
class Comparison:
    """Every variant x seed of ``specs`` x ``seeds`` from one shared start, in ``out``: the SFT-only
    run ``<out>/sft`` (``init=None``: ``trainer.max_steps=0``, ``trainer.seed=sft_seed``,
    ``trainer.sft_steps=sft_steps`` when given, else the configuration's) or the HF directory
    ``init``; ``<out>/start`` evaluates a start whose step 0 was not evaluated on ``split``.
    ``overrides`` reach every run, and the variant's own after them; what the comparison sets
    itself (the start, the seeds, the split, the SFT) comes last, so the shared runs train no RL
    step and the variants no SFT whatever the overrides say (:meth:`check` refuses overrides of
    those settings, and of the run directories)."""

    out: Path
    specs: list[str]
    seeds: list[int]
    overrides: list[str]
    split: str
    init: str | None = None
    sft_seed: int = 0
    sft_steps: int | None = None

    @property
    def start(self) -> str:
        """The HF directory every variant starts from."""
        return self.init if self.init is not None else str(self.out / "sft" / "sft_model")

    def sft_run(self) -> MainJobRun:
        sft_steps = [] if self.sft_steps is None else [f"trainer.sft_steps={self.sft_steps}"]
        return MainJobRun(self.out / "sft", ["trainer.plot=false", *self.overrides, "trainer.max_steps=0", *sft_steps,
                                             f"trainer.seed={self.sft_seed}", f"trainer.eval_split={self.split}"])

    def start_run(self) -> MainJobRun:
        return MainJobRun(self.out / "start", ["trainer.plot=false", "trainer.export_hf=false", *self.overrides,
                                               "trainer.max_steps=0", "trainer.sft_steps=0",
                                               f"model.hf_path={self.start}", f"trainer.seed={self.sft_seed}",
                                               f"trainer.eval_split={self.split}"])

    def variant_run(self, spec: str, seed: int) -> MainJobRun:
        """The run of variant ``spec`` (``preset[:key=value,...]``) with ``trainer.seed=seed``."""
        preset, variant_overrides = parse_variant(spec)
        return MainJobRun(self.out / variant_dir_name(spec) / f"seed{seed}",
                          [f"algo={preset}", "trainer.eval_before_rl=false", "trainer.export_hf=false",
                           "trainer.plot=false", *self.overrides, *variant_overrides, f"model.hf_path={self.start}",
                           "trainer.sft_steps=0", f"trainer.seed={seed}", f"trainer.eval_split={self.split}"])

    def check(self, fixed: dict[str, str]) -> int:
        """Everything before anything runs; the number of runs checked. No override sets a setting
        of ``fixed`` (:func:`fixed_settings`); the command of every run (the shared SFT run, the
        start's evaluation where it may be needed, each variant x seed) composes and validates
        (:meth:`MainJobRun.check`: a variant from a start not made yet is composed on the model
        the start is trained from); the shared SFT run trains (``trainer.sft_steps`` > 0) and every
        run evaluates (``trainer.eval_tasks`` > 0). One :class:`ConfigError` line, or
        :class:`StaleRunError`, for the first problem."""
        from megatron_sdar.config.schema import ConfigError

        refuse_fixed(self.overrides, fixed, "an override of every run")
        for spec in self.specs:
            refuse_fixed(parse_variant(spec)[1], fixed, f"variant {spec}")
        # the start the shared SFT run makes (an --init must be there: it is read as given)
        made_here = self.init is None and not (Path(self.start) / "config.json").is_file()
        pending = self.start if made_here else None
        runs = [self.variant_run(spec, seed) for spec in self.specs for seed in self.seeds]
        if not start_rows(Path(self.start), self.split):
            runs.insert(0, self.start_run())
        if self.init is None:
            sft = self.sft_run().check()
            if sft.trainer.sft_steps < 1:
                raise ConfigError("the shared SFT run would make no start (trainer.sft_steps=0): pass --sft-steps N, "
                                  "or --init <HF dir> to start from a model made elsewhere")
        for run in runs:
            config = run.check(pending)
            if config.trainer.eval_tasks < 1:
                raise ConfigError("trainer.eval_tasks=0: a comparison scores held-out success; set "
                                  "trainer.eval_tasks >= 1")
        return len(runs) + (self.init is None)

    def shared_start(self, log=print) -> list[dict]:
        """The step-0 evaluation rows of the start every run takes, made first when needed: the
        SFT-only run (no ``init``), evaluated on ``split``; a start whose run was not evaluated
        on ``split`` is evaluated there by ``<out>/start`` (no training): every comparison has its
        start, so that a run ending below it is counted."""
        if self.init is None:
            self.sft_run().ensure(log)
        rows = start_rows(Path(self.start), self.split)
        if rows:
            log(f"step 0: the evaluation of {Path(self.start).parent} (the run that wrote {self.start})")
            return rows
        start = self.start_run()
        log(f"step 0: evaluating {self.start} on the {self.split} split ({start.run_dir})")
        start.ensure(log)
        return [r for r in eval_rows(start.run_dir / "metrics.jsonl") if r["step"] == 0]

    def run_variants(self, log=print) -> dict[str, dict[str, list[dict]]]:
        """Every variant x seed from the start (run, resumed or kept): variant -> seed (a string) ->
        the run's evaluation rows; the last row also holds ``collapse_warnings``, the steps at which
        the run warned that its policy was collapsing
        (:func:`~megatron_sdar.trainer.loop.collapse_warning`)."""
        results: dict[str, dict[str, list[dict]]] = {}
        total, done = len(self.specs) * len(self.seeds), 0
        for spec in self.specs:
            results[spec] = {}
            for seed in self.seeds:
                done += 1
                log(f"run {done}/{total}: {spec} seed {seed}")
                run = self.variant_run(spec, seed)
                run.ensure(log)
                rows = eval_rows(run.run_dir / "metrics.jsonl")
                if rows:
                    rows[-1]["collapse_warnings"] = collapse_steps(run.run_dir / "metrics.jsonl")
                results[spec][str(seed)] = rows
        return results


def add_comparison_arguments(parser, *, seeds: list[int], out: str) -> None:
    """The options ``tools/compare_algos.py`` and ``tools/sweep.py`` share: the seeds, the shared
    start (``--sft-seed``, ``--sft-steps``, ``--init``), ``--out`` and the overrides of every run."""
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides passed to every run (trainer.max_steps: the variants' RL budget); not "
                             "of what the tool sets itself (model.hf_path, trainer.sft_steps, trainer.seed, "
                             "trainer.eval_split, trainer.output_dir, algo, trainer.resume): its options do")
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds, help="trainer.seed of each variant's runs")
    parser.add_argument("--sft-seed", type=int, default=0, help="trainer.seed of the shared SFT run")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="trainer.sft_steps of the shared SFT run (default: the configuration's); the variants "
                             "run no SFT")
    parser.add_argument("--out", default=out, help="the directory of every run")
    parser.add_argument("--init", default=None, help="HF checkpoint every run starts from (default: SFT first)")


def comparison_of(parser, args, specs: list[str], split: str) -> Comparison:
    """The :class:`Comparison` of the parsed options of :func:`add_comparison_arguments`
    (``parser.error`` for repeated seeds, or ``--sft-steps`` with ``--init``)."""
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeats: {args.seeds}")
    if args.init is not None and args.sft_steps is not None:
        parser.error("--sft-steps sizes the shared SFT run, which --init replaces: pass one")
    return Comparison(Path(args.out), specs, args.seeds, args.overrides, split, args.init, args.sft_seed,
                      args.sft_steps)


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
    """``body()``'s exit code, or one line on stderr and 2 for a configuration error (the tool's
    checks, or a run the trainer refused), a stale run directory (nothing was run), 1 for a run that
    failed otherwise."""
    from megatron_sdar.config.schema import ConfigError

    try:
        return body()
    except ConfigError as exc:
        print(f"{tool}: configuration error: {exc}", file=sys.stderr)
        return 2
    except StaleRunError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 2 if exc.returncode == 2 else 1


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
