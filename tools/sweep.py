"""Choose each method's settings on the validation split: a grid of overrides x seeds per preset,
every run from one shared SFT start at the same budget, scored on validation tasks only.

    bash tools/run.sh tools/sweep.py \
        --grid sdar algo.distill_coef=0.01,0.1,0.3,1 \
        --grid grpo trainer.lr=3e-4,1e-3 rollout.invalid_action_penalty=0,0.1 \
        --seeds 10 11 12 --out outputs/sweep [--init <run>/sft_model] [hydra overrides for every run...]

``--grid PRESET KEY=V1,V2,... [KEY=...]`` (Hydra's sweep syntax for the values) runs every
combination of the listed values for that preset; give ``--grid`` once per method. Each setting is
a variant ``PRESET:KEY=V,...`` of ``tools/compare_algos.py`` and runs exactly as it would there
(the same shared SFT start, sized by ``--sft-steps``, the same run directories, reuse and stale-run
refusal), but with ``trainer.eval_split=validation``: the test split is never read, so the choice
does not leak into what is reported.

As in ``tools/compare_algos.py``, everything is checked before anything runs: every run's command
(the shared SFT run included) composes and validates, and a bad key or value is one line,
``sweep: configuration error: ...``, and exit code 2, with nothing run. The overrides (and the grid's
keys) may not set what the sweep sets itself: ``model.hf_path`` (``--init``), ``trainer.sft_steps``
(``--sft-steps``), ``trainer.seed`` (``--seeds``, ``--sft-seed``), ``trainer.eval_split`` (always
validation), ``trainer.output_dir`` (``--out``), ``algo`` (``--grid``), ``trainer.resume``.
``trainer.max_steps`` is the settings' RL budget: the shared SFT run trains no RL step.

Score: held-out validation success at the last step, over the seeds: the mean with its 95%
t-interval. The best setting of each preset is the one with the fewest runs that end below their
start (the shared start's validation success: a run that made the agent worse counts against its
setting, however good the others), then the highest lower end of that interval, so a setting must
be good on every seed, not only on average: a learning rate that reaches 0.9 on two seeds and
collapses on the third loses to a steady one of the same mean. Writes ``<out>/sweep.md`` (every setting, per
seed and mean, the best of each preset marked), ``<out>/sweep.json`` and prints the chosen
overrides of each preset, ready for ``megatron_sdar/config/tuned/``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys


def expand_grid(preset: str, axes: list[str]) -> list[str]:
    """``("sdar", ["algo.distill_coef=0.1,1", "trainer.lr=1e-3"])`` -> the variant of every
    combination, ``["sdar:algo.distill_coef=0.1,trainer.lr=1e-3", "sdar:algo.distill_coef=1,trainer.lr=1e-3"]``."""
    keys, values = [], []
    for axis in axes:
        key, sep, listed = axis.partition("=")
        options = [v for v in listed.split(",") if v]
        if not sep or not key or not options:
            raise ValueError(f"--grid {preset}: {axis!r} is not KEY=V1,V2,...")
        if key in keys:
            raise ValueError(f"--grid {preset}: {key} is listed twice")
        keys.append(key)
        values.append(options)
    if not keys:
        return [preset]
    return [f"{preset}:" + ",".join(f"{k}={v}" for k, v in zip(keys, combo)) for combo in itertools.product(*values)]


def score_table(scores: dict[str, dict[str, dict[str, float]]], seeds: list[int], step: int | None,
                start: float | None = None) -> str:
    """The markdown table of ``scores[preset][variant][seed] = validation success`` (``start``: the
    shared start's validation success)."""
    from megatron_sdar.utils.stats import mean_ci

    below_head = f"runs below the start ({start:.3f})" if start is not None else "runs below the start"
    lines = [f"| preset | setting | {' | '.join(f'seed {s}' for s in seeds)} | validation success at step {step} "
             f"(mean ± 95% CI) | lower end | {below_head} | |", "|" + " --- |" * (len(seeds) + 6)]
    for preset, variants in scores.items():
        best = best_variant(variants, start)
        for variant, per_seed in variants.items():
            mean, half = mean_ci(list(per_seed.values()))
            setting = variant.partition(":")[2] or "(preset values)"
            cells = [f"{per_seed[str(s)]:.3f}" if str(s) in per_seed else "-" for s in seeds]
            interval = f"{mean:.3f}" + ("" if half != half else f" ± {half:.3f}")
            below = "-" if start is None else str(runs_below(per_seed, start))
            lines.append(f"| {preset} | {setting} | {' | '.join(cells)} | {interval} | {lower_bound(per_seed):.3f} "
                         f"| {below} | {'**best**' if variant == best else ''} |")
    return "\n".join(lines) + "\n"


def lower_bound(per_seed: dict[str, float]) -> float:
    """The lower end of the 95% t-interval of the mean over seeds (the mean itself for one seed)."""
    from megatron_sdar.utils.stats import mean_ci

    mean, half = mean_ci(list(per_seed.values()))
    return mean if half != half else mean - half


def runs_below(per_seed: dict[str, float], start: float) -> int:
    """How many of a setting's runs end below the start."""
    return sum(value < start for value in per_seed.values())


def best_variant(variants: dict[str, dict[str, float]], start: float | None = None) -> str:
    """The setting with the fewest runs that end below ``start`` (when given), then the highest
    lower end of its 95% interval over seeds: good on every seed, not only on average (a setting
    that collapses on one seed in three loses to a steady one of the same mean); the first listed
    among equals."""
    bounds = {v: lower_bound(s) for v, s in variants.items() if s}
    below = {v: runs_below(variants[v], start) if start is not None else 0 for v in bounds}
    return max(bounds, key=lambda v: (-below[v], bounds[v], -list(variants).index(v)))


def main(argv: list[str] | None = None) -> int:
    from megatron_sdar.trainer.comparison import add_comparison_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs="+", action="append", required=True, metavar="PRESET KEY=V1,V2",
                        help="a preset and the values to try for each key (repeat --grid per preset)")
    add_comparison_arguments(parser, seeds=[10, 11, 12], out="outputs/sweep")
    args = parser.parse_args(argv)

    from megatron_sdar.algo.objective import PRESETS
    from megatron_sdar.trainer.comparison import comparison_of, exit_code_of_errors, final_success, fixed_settings

    grids: dict[str, list[str]] = {}
    for preset, *axes in args.grid:
        if preset not in PRESETS:
            parser.error(f"--grid: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        if preset in grids:
            parser.error(f"--grid: {preset} is given twice (list every key of a preset in one --grid)")
        try:
            grids[preset] = expand_grid(preset, axes)
        except ValueError as exc:
            parser.error(str(exc))
    comparison = comparison_of(parser, args, [spec for variants in grids.values() for spec in variants], "validation")
    out = comparison.out

    def log(message: str) -> None:
        print(f"[sweep] {message}", flush=True)

    def sweep() -> int:
        checked = comparison.check(fixed_settings("--grid {value} KEY=V1,V2,...", "the sweep scores the validation "
                                                  "split (tools/compare_algos.py --split test reports the test split)"))
        log(f"the configuration of {checked} runs checked")
        start_rows = comparison.shared_start(log)
        start = start_rows[0]["eval/success_rate"] if start_rows else None
        results = comparison.run_variants(log)
        scores = {preset: {spec: {seed: final_success(rows) for seed, rows in results[spec].items() if rows}
                           for spec in variants} for preset, variants in grids.items()}
        steps = {max(r["step"] for r in rows) for runs in results.values() for rows in runs.values() if rows}
        if not steps:
            print("sweep: error: no run evaluated anything (trainer.eval_tasks=0?)", file=sys.stderr)
            return 2
        table = score_table(scores, args.seeds, max(steps), start)
        chosen = {preset: best_variant(variants, start) for preset, variants in scores.items()}
        (out / "sweep.md").write_text(table)
        (out / "sweep.json").write_text(json.dumps({"seeds": args.seeds, "step": max(steps), "init": comparison.start,
                                                    "start": start, "overrides": args.overrides, "scores": scores,
                                                    "best": chosen}, indent=2))
        print(table, flush=True)
        for preset, spec in chosen.items():
            log(f"best {preset}: {spec.partition(':')[2] or '(preset values)'}")
        log(f"{out / 'sweep.md'}, {out / 'sweep.json'}")
        return 0

    return exit_code_of_errors("sweep", sweep)


if __name__ == "__main__":
    sys.exit(main())
