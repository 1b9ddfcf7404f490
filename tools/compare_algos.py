"""Run several presets with the same seed and budget on the same world; one plot with every curve.

    bash tools/run.sh tools/compare_algos.py [--algos grpo sdar] [--out outputs/compare] [hydra overrides...]

First one SFT-only run (``trainer.max_steps=0``) makes the shared starting point
(``<out>/sft/hf_export``); then each preset is a separate ``python -m megatron_sdar.train
algo=<preset>`` run from it (same seed, same steps, fresh optimizer). The runs' ``metrics.jsonl``
go into one PNG (``<out>/comparison.png``) and the evaluations are printed and written to
``<out>/comparison.json``. Whatever the result, it is reported as measured. ``--init <HF dir>``
skips the SFT run and starts every preset from that checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["grpo", "sdar"])
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--init", default=None, help="HF checkpoint every preset starts from (default: SFT first)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args()

    from megatron_sdar.algo.objective import PRESETS
    from megatron_sdar.utils.logging import read_metrics
    from megatron_sdar.utils.plots import plot_comparison

    unknown = [a for a in args.algos if a not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    out = Path(args.out)

    def train(*overrides: str) -> None:
        command = [sys.executable, "-m", "megatron_sdar.train", *overrides]
        print(f"[compare] {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command, env=dict(os.environ))
        if result.returncode != 0:
            raise SystemExit(f"[compare] run failed with exit code {result.returncode}: {' '.join(overrides)}")

    init = args.init
    if init is None:
        train(f"trainer.output_dir={out / 'sft'}", "trainer.max_steps=0", "trainer.plot=false", *args.overrides)
        init = str(out / "sft" / "hf_export")
    runs: dict[str, Path] = {}
    for algo in args.algos:
        run_dir = out / algo
        train(f"algo={algo}", f"trainer.output_dir={run_dir}", f"model.hf_path={init}", "trainer.sft_steps=0",
              "trainer.export_hf=false", *args.overrides)
        runs[algo] = run_dir / "metrics.jsonl"
    plot_comparison(runs, out / "comparison.png")
    summary = {}
    for algo, path in runs.items():
        rows = read_metrics(path)
        evals = [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
        rollouts = [r["rollout/success_rate"] for r in rows if "rollout/success_rate" in r]
        summary[algo] = {"eval_success_by_step": evals, "final_eval_success": evals[-1][1] if evals else None,
                         "mean_rollout_success": sum(rollouts) / len(rollouts) if rollouts else None}
        print(f"[compare] {algo:<10} eval success by step {evals}  mean rollout success "
              f"{summary[algo]['mean_rollout_success']}")
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    print(f"[compare] plot: {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
