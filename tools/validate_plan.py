"""Check the memory planner against a measurement: peak RSS of a real tiny Megatron model on CPU.

A child process builds a Qwen2-style GPTModel (fp32, Megatron's local layer spec through the CPU
shims), wraps it in Megatron's DDP (fp32 main-grad buffer) and Megatron's Adam, and runs two
training iterations (forward, cross-entropy over the vocabulary, backward, optimizer step: the
second iteration is the steady state, with Adam's moments allocated). Its peak RSS
(``ru_maxrss``) minus the RSS peak right after imports and process-group setup is compared with
:func:`megatron_sdar.utils.memory_plan.estimate` for the same shapes (kernels="unfused", no
reference model, no teacher pass, no vLLM, no overhead allowance).

    bash tools/run.sh tools/validate_plan.py                      # default config, prints the ratio
    bash tools/run.sh tools/validate_plan.py --hidden 512 --layers 4 --tolerance 0.25

Exit status 1 when |estimate / measured - 1| exceeds ``--tolerance``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def _hf_config(args: argparse.Namespace) -> dict:
    return {
        "model_type": "qwen2", "hidden_size": args.hidden, "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab, "tie_word_embeddings": False,
        "max_position_embeddings": max(2048, args.seq), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> dict:
    """Build, train two iterations, report the peak RSS over the post-import baseline."""
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.utils.device import causal_attention_mask
    from megatron_sdar.utils.distributed import destroy, init_process_group, initialize_megatron_parallel

    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    init_process_group()
    initialize_megatron_parallel()
    baseline = _rss_peak_bytes()
    start = time.perf_counter()

    arch = QwenArchitecture.from_hf_config(_hf_config(args))
    model = build_model(arch, params_dtype=torch.float32)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False, fp16=False, params_dtype=torch.float32,
                        use_distributed_optimizer=False, clip_grad=1.0),
        [ddp])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(args.seq).expand(args.mbs, args.seq)
    mask = causal_attention_mask(args.seq)
    losses = []
    for _ in range(args.iterations):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        logits = ddp(inputs, positions, mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        del logits
        ddp.finish_grad_sync()
        optimizer.step()
        losses.append(loss.item())
    peak = _rss_peak_bytes()
    destroy()
    params = sum(p.numel() for p in model.parameters())
    return {"baseline_bytes": baseline, "peak_bytes": peak, "params": params, "losses": losses,
            "seconds": time.perf_counter() - start}


def planned_gib(args: argparse.Namespace) -> float:
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.utils.memory_plan import Workload, estimate
    from megatron_sdar.utils.parallel_dims import ParallelDims

    arch = QwenArchitecture.from_hf_config(_hf_config(args))  # the model the child builds
    work = Workload(seq_len=args.seq, micro_batch_size=args.mbs, global_batch_size=args.mbs, precision="fp32",
                    kernels="unfused", reference_model=False, teacher_pass=False)
    est = estimate(arch, ParallelDims(distributed_optimizer=False), work, name="validation", capacity_gib=1e6,
                   overhead_gib=0.0)
    return est.total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *(argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"measurement process failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    measured = (res["peak_bytes"] - res["baseline_bytes"]) / GIB
    planned = planned_gib(args)
    ratio = planned / measured
    ok = abs(ratio - 1.0) <= args.tolerance
    report = {"params": res["params"], "measured_gib": round(measured, 3), "planned_gib": round(planned, 3),
              "ratio": round(ratio, 3), "baseline_gib": round(res["baseline_bytes"] / GIB, 3),
              "seconds": round(res["seconds"], 1), "losses": res["losses"], "within_tolerance": ok}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"tiny model: {res['params'] / 1e6:.1f}M params, seq {args.seq} x mbs {args.mbs}, fp32, CPU")
        print(f"measured peak RSS over baseline: {measured:.3f} GiB (baseline {report['baseline_gib']} GiB)")
        print(f"planner estimate:                {planned:.3f} GiB   ratio {ratio:.3f} "
              f"({'within' if ok else 'OUTSIDE'} +-{args.tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
