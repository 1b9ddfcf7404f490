"""Per-GPU memory planner for SDAR training layouts (estimates; see megatron_sdar/utils/memory_plan.py).

    python tools/plan.py --model qwen2_5_72b_instruct --tp 8 --pp 4 --dp 2 --recompute full \\
        --seq-len 2560 --gpu-memory-utilization 0.3 --rollout-tp 8
    python tools/plan.py --model path/to/hf_dir_or_config.json --tp 2 --precision fp8
    python tools/plan.py --experiment alfworld_qwen2_5_72b       # a recipe's layout
    python tools/plan.py --all-recipes                           # the README table

Exit status 2 when a planned layout does not fit (``--gpu-gib``, default an H100 80GB).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sdar.utils.memory_plan import (  # noqa: E402
    H100_GIB, KERNELS, PRECISIONS, PlanError, Rollout, Workload, estimate, format_estimate, load_model_shape,
    load_recipe, recipe_table,
)
from megatron_sdar.utils.parallel_dims import RECOMPUTE, ParallelDims  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model yaml name, yaml path, HF config.json or HF directory")
    src.add_argument("--experiment", help="experiment recipe name or path (layout from its yaml)")
    src.add_argument("--all-recipes", action="store_true", help="markdown table of every recipe")
    lay = p.add_argument_group("layout (with --experiment: overrides)")
    for key in ("tp", "pp", "cp", "dp", "ep", "etp", "vpp"):
        lay.add_argument(f"--{key}", type=int)
    lay.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction)
    lay.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction)
    lay.add_argument("--recompute", choices=RECOMPUTE)
    wl = p.add_argument_group("workload")
    wl.add_argument("--seq-len", type=int, help="prompt + response tokens of one training sample")
    wl.add_argument("--teacher-extra-tokens", type=int, help="privileged-context tokens in front (teacher)")
    wl.add_argument("--micro-batch-size", type=int)
    wl.add_argument("--global-batch-size", type=int)
    wl.add_argument("--precision", choices=PRECISIONS)
    wl.add_argument("--kernels", choices=KERNELS, help="fused (GPU) or unfused (CPU local spec)")
    wl.add_argument("--no-reference", action="store_true", help="no frozen KL reference model on the GPU")
    ro = p.add_argument_group("rollout engine (vLLM)")
    ro.add_argument("--gpu-memory-utilization", type=float)
    ro.add_argument("--rollout-tp", type=int)
    ro.add_argument("--rollout-fp8", action=argparse.BooleanOptionalAction)
    ro.add_argument("--rollout-sleeps", action=argparse.BooleanOptionalAction,
                    help="vLLM frees its pool while Megatron trains")
    dev = p.add_argument_group("device")
    dev.add_argument("--gpu-gib", type=float, default=H100_GIB, help="usable GPU memory (default H100 80GB)")
    dev.add_argument("--overhead-gib", type=float, default=3.0, help="CUDA context, NCCL, fragmentation")
    dev.add_argument("--baseline-gb", type=float, default=0.0,
                     help="memory already used before training (e.g. a process's RSS after imports), added")
    p.add_argument("--json", action="store_true")
    return p


def _set(obj, **values):
    return replace(obj, **{k: v for k, v in values.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.all_recipes:
            print(recipe_table(overhead_gib=args.overhead_gib + args.baseline_gb, capacity_gib=args.gpu_gib))
            return 0
        if args.experiment:
            recipe = load_recipe(args.experiment)
            shape, layout, work, rollout = (load_model_shape(recipe.model), recipe.layout, recipe.workload,
                                            recipe.rollout)
        else:
            shape, layout, work, rollout = load_model_shape(args.model), ParallelDims(), Workload(), Rollout()
        layout = _set(layout, tp=args.tp, pp=args.pp, cp=args.cp, dp=args.dp, ep=args.ep, etp=args.etp,
                      vpp=args.vpp, sequence_parallel=args.sequence_parallel,
                      distributed_optimizer=args.distributed_optimizer, recompute=args.recompute)
        work = _set(work, seq_len=args.seq_len, teacher_extra_tokens=args.teacher_extra_tokens,
                    micro_batch_size=args.micro_batch_size, precision=args.precision, kernels=args.kernels,
                    reference_model=False if args.no_reference else None)
        gbs = args.global_batch_size
        if gbs is None and work.global_batch_size % (work.micro_batch_size * layout.dp):
            gbs = work.micro_batch_size * layout.dp  # the default batch must divide; one micro-batch per rank
        work = _set(work, global_batch_size=gbs)
        rollout = _set(rollout, gpu_memory_utilization=args.gpu_memory_utilization, tp=args.rollout_tp,
                       fp8=args.rollout_fp8, sleeps=args.rollout_sleeps)
        est = estimate(shape, layout, work, rollout, capacity_gib=args.gpu_gib,
                       overhead_gib=args.overhead_gib + args.baseline_gb)
    except PlanError as exc:
        print(f"plan.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(est.as_dict(), indent=1) if args.json else format_estimate(est))
    return 0 if est.fits else 2


if __name__ == "__main__":
    sys.exit(main())
