"""When does SDAR beat GRPO? One point per level of reward scarcity: GRPO's share of groups with
reward contrast at its first step (x) against SDAR minus GRPO at the last evaluated step (y), each
with its 95% t-interval over the seeds, the difference paired by seed.

    bash tools/run.sh tools/regime.py --level household outputs/compare \\
        --level slack2 outputs/cmp_slack2 --level knowledge outputs/cmp_knowledge \\
        --grpo grpo --sdar "sdar_full:algo.teacher=frozen" --out outputs/regime

Each ``--level NAME DIR`` is a ``tools/compare_algos.py`` output directory that holds both variants
(``--grpo`` and ``--sdar``, as compare_algos names them) over the same seeds. Writes
``<out>/regime.png``, ``<out>/regime.md`` (the table) and ``<out>/regime.json``. Nothing is run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def level_point(name: str, directory: Path, grpo: str, sdar: str) -> dict:
    """The point of one level: x = GRPO's ``rollout/success_contrast_groups`` at step 1, y = SDAR minus
    GRPO held-out success at the last step both evaluated, paired by seed."""
    from megatron_sdar.trainer.comparison import variant_dir_name
    from megatron_sdar.utils.logging import read_metrics
    from megatron_sdar.utils.stats import mean_ci

    summary_file = directory / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"--level {name}: {summary_file} does not exist (run tools/compare_algos.py first)")
    summary = json.loads(summary_file.read_text())
    missing = [v for v in (grpo, sdar) if v not in summary]
    if missing:
        raise KeyError(f"--level {name}: {summary_file} has no variant {missing[0]!r}; it has {sorted(summary)}")
    contrast = []
    for seed in summary[grpo]:
        rows = read_metrics(directory / variant_dir_name(grpo) / f"seed{seed}" / "metrics.jsonl")
        contrast += [r["rollout/success_contrast_groups"] for r in rows if r.get("step") == 1
                     and "rollout/success_contrast_groups" in r]
    finals = {}
    for variant in (grpo, sdar):
        finals[variant] = {seed: max(rows, key=lambda r: r["step"]) for seed, rows in summary[variant].items() if rows}
    seeds = sorted(set(finals[grpo]) & set(finals[sdar]), key=int)
    steps = {finals[v][s]["step"] for v in (grpo, sdar) for s in seeds}
    if len(steps) != 1:
        raise ValueError(f"--level {name}: the runs end at different steps {sorted(steps)}")
    diffs = [finals[sdar][s]["eval/success_rate"] - finals[grpo][s]["eval/success_rate"] for s in seeds]
    x, x_half = mean_ci(contrast)
    y, y_half = mean_ci(diffs)
    return {"label": name, "dir": str(directory), "seeds": seeds, "step": steps.pop(), "x": x,
            "x_half": 0.0 if x_half != x_half else x_half, "y": y, "y_half": 0.0 if y_half != y_half else y_half,
            "contrast_step1": contrast, "differences": diffs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", nargs=2, action="append", required=True, metavar=("NAME", "DIR"))
    parser.add_argument("--grpo", default="grpo", help="the GRPO variant, as compare_algos names it")
    parser.add_argument("--sdar", default="sdar", help="the SDAR variant, as compare_algos names it")
    parser.add_argument("--out", default="outputs/regime")
    args = parser.parse_args(argv)

    from megatron_sdar.utils.plots import plot_regime

    try:
        points = [level_point(name, Path(d), args.grpo, args.sdar) for name, d in args.level]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"regime: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"| level | seeds | GRPO's contrast share at step 1 | {args.sdar} minus {args.grpo} at the last step |",
             "| --- | --- | --- | --- |"]
    for p in points:
        verdict = " (inside the noise)" if abs(p["y"]) <= p["y_half"] else ""
        lines.append(f"| {p['label']} | {len(p['seeds'])} | {p['x']:.3f} ± {p['x_half']:.3f} | "
                     f"{p['y']:+.3f} ± {p['y_half']:.3f}{verdict} (step {p['step']}) |")
    table = "\n".join(lines) + "\n"
    (out / "regime.md").write_text(table)
    (out / "regime.json").write_text(json.dumps({"grpo": args.grpo, "sdar": args.sdar, "points": points}, indent=2))
    plot_regime(points, out / "regime.png", xlabel="GRPO's share of groups with reward contrast at step 1",
                ylabel=f"{args.sdar} minus {args.grpo}, held-out success", title="When SDAR beats GRPO")
    print(table, flush=True)
    print(f"[regime] {out / 'regime.png'}, {out / 'regime.md'}, {out / 'regime.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
