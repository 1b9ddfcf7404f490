"""FP8 vs BF16 training-step time and loss of a mid-size Qwen-shaped model (GPU + Transformer Engine).

    bash tools/run.sh tools/bench_fp8.py                         # 1.3B-ish: hidden 2048, 16 layers
    bash tools/run.sh tools/bench_fp8.py --recipe delayed --hidden 4096 --layers 8 --seq 4096 --steps 20

Random weights and tokens, Adam (megatron-core), same initial weights for both precisions; prints
the median step time, tokens/s and the loss after each step for BF16 and for FP8. CPU: exits with
an error (FP8 GEMMs need Transformer Engine on an Ada/Hopper/Blackwell GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def run(args: argparse.Namespace, fp8_kwargs: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.utils.device import causal_attention_mask

    arch = QwenArchitecture.from_hf_config({
        "model_type": "qwen3", "hidden_size": args.hidden, "intermediate_size": args.ffn or 3 * args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 128,
        "num_key_value_heads": max(1, args.hidden // 1024), "head_dim": 128, "vocab_size": args.vocab,
        "tie_word_embeddings": False, "max_position_embeddings": args.seq, "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    model = build_model(arch, use_transformer_engine=True, **fp8_kwargs)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, **({"fp8_param_gather": False} if fp8_kwargs else {})), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, params_dtype=torch.bfloat16,
                                                 clip_grad=1.0), [ddp])
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=gen).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(args.seq, device="cuda").expand(args.mbs, args.seq)
    mask = causal_attention_mask(args.seq, device="cuda")
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        logits = ddp(inputs, pos, mask)
        loss = F.cross_entropy(logits.float()[..., : args.vocab].reshape(-1, args.vocab), labels.reshape(-1))
        loss.backward()
        ddp.finish_grad_sync()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = statistics.median(times[args.warmup:])
    return {"step_s": step, "tokens_per_s": args.mbs * args.seq / step, "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 1024**3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None, help="delayed | tensorwise | blockwise | mxfp8 (default: by GPU)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from megatron_sdar.models.precision import FP8ConfigError, resolve_precision
    from megatron_sdar.utils.distributed import destroy, init_process_group, initialize_megatron_parallel

    if not torch.cuda.is_available():
        print("bench_fp8.py: needs a CUDA GPU with Transformer Engine (FP8 GEMMs); none is visible", file=sys.stderr)
        return 2
    recipe = args.recipe or ("mxfp8" if torch.cuda.get_device_capability() >= (10, 0) else "tensorwise")
    try:
        settings = resolve_precision("bfloat16", recipe)
    except FP8ConfigError as exc:
        print(f"bench_fp8.py: {exc}", file=sys.stderr)
        return 2
    init_process_group()
    initialize_megatron_parallel()
    results = {}
    for name, kwargs in (("bf16", {}), (f"fp8-{recipe}", settings.transformer_config_kwargs())):
        results[name] = run(args, kwargs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    destroy()
    base = results["bf16"]["step_s"]
    for name, r in results.items():
        print(f"{name:>16}: step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  speedup "
              f"{base / r['step_s']:.2f}x  peak {r['peak_gib']:.1f} GiB  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    print(json.dumps({"device": torch.cuda.get_device_name(), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
