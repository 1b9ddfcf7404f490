"""Per-GPU memory planner for SDAR training layouts (estimates; see megatron_sdar/utils/memory_plan.py).

    bash tools/run.sh tools/plan.py --experiment alfworld_qwen2_5_72b         # a recipe's layout
    bash tools/run.sh tools/plan.py --experiment alfworld_qwen2_5_7b parallel.tp=4 rollout.gpu_memory_utilization=0.3
    bash tools/run.sh tools/plan.py --model qwen2_5_72b_instruct --tp 8 --pp 4 --dp 2 --recompute full \\
        --seq-len 2560 --gpu-memory-utilization 0.3 --rollout-tp 8
    bash tools/run.sh tools/plan.py --model path/to/hf_dir_or_config.json --tp 2 --precision fp8
    bash tools/run.sh tools/plan.py --all-recipes                             # the README table

A run is composed exactly as ``python -m megatron_sdar.train <overrides>`` composes it (the
positional arguments are its Hydra overrides; the layout and precision flags become overrides too)
and validated, except that nothing is downloaded: the model's shape comes from its ``config.json``
when ``model.hf_path`` holds one, else from the model YAML's ``architecture:`` block, and the skill
set is not read. ``--experiment``: the recipe's layout, world size (``slurm``) and workload.
``--model``: the model alone, with the layout and workload of the flags (one sequence of
``--seq-len`` tokens per micro-batch, no vLLM unless ``--gpu-memory-utilization``).

Exit status 2 when a planned layout does not fit (``--gpu-gib``, default an H100 80GB), 1 on an
invalid configuration or layout (one line).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from megatron_sdar.utils.memory_plan import (
    H100_GIB, KERNELS, PRECISIONS, PlanError, Rollout, Workload, compose_plan, estimate, format_estimate,
    recipe_table,
)
from megatron_sdar.utils.parallel_dims import RECOMPUTE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model config name (config/model/<name>.yaml), HF directory or its config.json")
    src.add_argument("--experiment", help="recipe name (config/experiment/<name>.yaml)")
    src.add_argument("--all-recipes", action="store_true", help="markdown table of every recipe")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m megatron_sdar.train")
    lay = p.add_argument_group("layout (overrides of the parallel group; --dp sets the world size tp*pp*cp*dp)")
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
    wl.add_argument("--precision", choices=PRECISIONS, help="model.dtype / model.fp8 (fp8: model.fp8=tensorwise)")
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


def _overrides(args: argparse.Namespace) -> list[str]:
    """The composition's overrides: the source, the layout / precision / rollout flags, then the
    positional Hydra overrides (which win)."""
    if args.experiment:
        out = [f"experiment={args.experiment}"]
    else:
        path = Path(args.model)
        if path.name == "config.json":
            path = path.parent
        if path.is_dir():  # an HF directory: the embedded default's model entry pointed at it
            out = [f"model.hf_path={path}", f"model.name={path.resolve().name}", "model.dtype=bfloat16"]
        else:
            out = [f"model={args.model}"]
    flags = {"parallel.tp": args.tp, "parallel.pp": args.pp, "parallel.cp": args.cp, "parallel.ep": args.ep,
             "parallel.vpp": args.vpp, "parallel.sequence_parallel": args.sequence_parallel,
             "parallel.distributed_optimizer": args.distributed_optimizer, "parallel.recompute": args.recompute,
             "rollout.tp": args.rollout_tp, "rollout.gpu_memory_utilization": args.gpu_memory_utilization,
             "model.fp8_rollout": args.rollout_fp8}
    out += [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in flags.items() if value is not None]
    if args.precision:
        out += {"bf16": ["model.dtype=bfloat16", "model.fp8=null"], "fp32": ["model.dtype=float32", "model.fp8=null"],
                "fp8": ["model.dtype=bfloat16", "model.fp8=tensorwise"]}[args.precision]
    return out + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    capacity, overhead = args.gpu_gib, args.overhead_gib + args.baseline_gb
    try:
        if args.all_recipes:
            print(recipe_table(overhead_gib=overhead, capacity_gib=capacity))
            return 0
        plan = compose_plan(_overrides(args), dp=args.dp if args.dp or args.experiment else 1)
        layout, work, rollout = _set(plan.layout, etp=args.etp), plan.workload, plan.rollout
        if args.model:  # the model alone: the workload and the engine of the flags, not the default run's
            work = Workload(precision=work.precision)
            rollout = Rollout(gpu_memory_utilization=args.gpu_memory_utilization or 0.0, tp=rollout.tp,
                              fp8=rollout.fp8)
        work = _set(work, seq_len=args.seq_len, teacher_extra_tokens=args.teacher_extra_tokens,
                    micro_batch_size=args.micro_batch_size, kernels=args.kernels,
                    reference_model=False if args.no_reference else None)
        gbs = args.global_batch_size
        if gbs is None and work.global_batch_size % (work.micro_batch_size * layout.dp):
            gbs = work.micro_batch_size * layout.dp  # the default batch must divide; one micro-batch per rank
        work = _set(work, global_batch_size=gbs)
        rollout = _set(rollout, sleeps=args.rollout_sleeps)
        est = estimate(plan.arch, layout, work, rollout, name=plan.model, capacity_gib=capacity,
                       overhead_gib=overhead)
    except PlanError as exc:  # a configuration or layout error: one line
        print(f"plan.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(est.as_dict(), indent=1) if args.json else format_estimate(est))
    return 0 if est.fits else 2


if __name__ == "__main__":
    sys.exit(main())
