"""Compare presets over several seeds from one shared SFT start; means with 95% confidence intervals.

    bash tools/run.sh tools/compare_algos.py --algos grpo sdar sdar:algo.estimator=full \
        --seeds 0 1 2 --out outputs/compare [hydra overrides for every run...]

1. One SFT-only run (``trainer.max_steps=0``, ``trainer.seed=--sft-seed``) makes the shared
   starting point ``<out>/sft/sft_model`` (the policy after SFT) and its evaluation (step 0: held-out success without
   skills, and with skills in the prompt: the teacher's edge). ``--init <HF dir>`` skips it; the
   step-0 evaluation is then taken from the run that wrote that directory, when it is a run's
   ``sft_model/`` (the main job's ``metrics.jsonl`` beside it), else step 0 is not reported.
2. Every variant x seed is one ``python -m megatron_sdar.train`` run from that start
   (``trainer.seed=S``: other training tasks and sampling seeds, the same held-out tasks), with a
   fresh optimizer and the same budget. A variant is a preset (``python -m megatron_sdar.train
   --help`` lists them), optionally with overrides:
   ``name:key=value,key=value`` (``sdar:algo.estimator=full``, ``sdar:env.retrieval=random``).
3. ``<out>/summary.json``: variant -> seed (a string) -> the run's evaluation rows (``step``,
   ``eval/success_rate``, ``eval/num_tasks``; the step-0 row of the shared start also
   ``eval/with_skills/success_rate``). ``<out>/summary.md``: the mean +- 95% t-interval over seeds
   at each evaluated step, and each variant's difference from the first one at the last step (paired
   by seed). ``<out>/comparison.png``: the means with shaded 95% bands.

A run that exists already (its ``metrics.jsonl`` reaches the last step) is not run again, so an
interrupted comparison resumes where it stopped. Whatever the numbers, they are reported as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVAL_KEYS = ("eval/success_rate", "eval/num_tasks", "eval/success_rate_ci_low", "eval/success_rate_ci_high")


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
    from megatron_sdar.utils.logging import read_metrics

    keep = (*EVAL_KEYS, "eval/with_skills/success_rate", "eval/greedy/success_rate")
    return [{"step": r["step"], **{k: r[k] for k in keep if k in r}}
            for r in read_metrics(metrics_jsonl) if "eval/success_rate" in r]


def init_start_rows(init: Path) -> list[dict]:
    """The step-0 evaluation rows of the run that wrote ``init`` when it is a run's ``sft_model/``."""
    metrics = init.parent / "metrics.jsonl"
    if init.name != "sft_model" or not metrics.is_file():
        return []
    return [r for r in eval_rows(metrics) if r["step"] == 0]


def summarize(summary: dict[str, dict[str, list[dict]]], baseline: str) -> str:
    """The markdown table of ``summary`` (module docstring)."""
    from megatron_sdar.utils.stats import mean_ci

    steps = sorted({row["step"] for runs in summary.values() for rows in runs.values() for row in rows})
    last = steps[-1] if steps else None
    head = ["variant", "seeds", *[f"step {s}" for s in steps], f"minus {baseline} at step {last}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base = {seed: {r["step"]: r["eval/success_rate"] for r in rows} for seed, rows in summary.get(baseline, {}).items()}
    for variant, runs in summary.items():
        by_seed = {seed: {r["step"]: r["eval/success_rate"] for r in rows} for seed, rows in runs.items()}
        cells = [variant, str(len(runs))]
        for step in steps:
            values = [v[step] for v in by_seed.values() if step in v]
            mean, half = mean_ci(values)
            cells.append("-" if not values else f"{mean:.3f}" + ("" if half != half else f" ± {half:.3f}"))
        paired = [v[last] - base[s][last] for s, v in by_seed.items() if last in v and last in base.get(s, {})]
        if variant == baseline or not paired:
            cells.append("-")
        else:
            mean, half = mean_ci(paired)
            verdict = "" if half != half else (" (inside the noise)" if abs(mean) <= half else "")
            cells.append(f"{mean:+.3f}" + ("" if half != half else f" ± {half:.3f}") + verdict)
        lines.append("| " + " | ".join(cells) + " |")
    n_tasks = {int(r.get("eval/num_tasks", 0)) for runs in summary.values() for rows in runs.values() for r in rows}
    lines.append("")
    lines.append(f"Held-out success on {', '.join(map(str, sorted(n_tasks)))} tasks per evaluation; mean ± half-width "
                 "of the 95% t-interval over seeds; the difference is paired by seed.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["grpo", "sdar"], help="variants: preset[:key=value,...]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sft-seed", type=int, default=0, help="trainer.seed of the shared SFT run")
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--init", default=None, help="HF checkpoint every run starts from (default: SFT first)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args(argv)

    from megatron_sdar.algo.objective import PRESETS
    from megatron_sdar.utils.logging import read_metrics
    from megatron_sdar.utils.plots import plot_bands

    try:
        variants = {spec: parse_variant(spec) for spec in args.algos}
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted({p for p, _ in variants.values() if p not in PRESETS})
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeats: {args.seeds}")
    out = Path(args.out)

    def finished(run_dir: Path) -> bool:
        config = run_dir / "config.json"
        if not (run_dir / "metrics.jsonl").is_file() or not config.is_file():
            return False
        max_steps = json.loads(config.read_text())["trainer"]["max_steps"]
        return any(r.get("step") == max_steps for r in read_metrics(run_dir / "metrics.jsonl"))

    def train(run_dir: Path, *overrides: str) -> None:
        if finished(run_dir):
            print(f"[compare] {run_dir} is complete, kept", flush=True)
            return
        command = [sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={run_dir}", *overrides]
        print(f"[compare] {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, env=dict(os.environ)).returncode != 0:
            raise SystemExit(f"[compare] run failed: {' '.join(command[1:])}")

    init, start_rows = args.init, []
    if init is None:
        train(out / "sft", "trainer.max_steps=0", "trainer.plot=false", f"trainer.seed={args.sft_seed}",
              *args.overrides)
        init = str(out / "sft" / "sft_model")
        start_rows = [r for r in eval_rows(out / "sft" / "metrics.jsonl") if r["step"] == 0]
    else:
        start_rows = init_start_rows(Path(init))
        if start_rows:
            print(f"[compare] step 0: the evaluation of {Path(init).parent} (the run that wrote {init})", flush=True)
    summary: dict[str, dict[str, list[dict]]] = {}
    for spec, (preset, variant_overrides) in variants.items():
        summary[spec] = {}
        for seed in args.seeds:
            run_dir = out / variant_dir_name(spec) / f"seed{seed}"
            train(run_dir, f"algo={preset}", f"model.hf_path={init}", "trainer.sft_steps=0",
                  "trainer.eval_before_rl=false", "trainer.export_hf=false", "trainer.plot=false",
                  f"trainer.seed={seed}", *args.overrides, *variant_overrides)
            summary[spec][str(seed)] = start_rows + eval_rows(run_dir / "metrics.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = summarize(summary, baseline=args.algos[0])
    (out / "summary.md").write_text(table)
    plot_bands({spec: {seed: [(r["step"], r["eval/success_rate"]) for r in rows] for seed, rows in runs.items()}
                for spec, runs in summary.items()}, out / "comparison.png",
               title=f"held-out success, mean and 95% band over seeds {args.seeds}")
    print(table, flush=True)
    print(f"[compare] {out / 'summary.json'}, {out / 'summary.md'}, {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
