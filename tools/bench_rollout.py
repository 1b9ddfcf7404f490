"""Rollout benchmark: agent-loop overhead vs raw vLLM generate, weight-sync throughput vs memcpy.

    bash tools/run.sh tools/bench_rollout.py [--episodes 16] [--turns 4] [--hidden 512 --layers 4]

1. Agent loop: runs ``--episodes`` household episodes (G=4 per task) for ``--turns`` turns with the
   real vLLM engine, recording every batch of prompts it sent. Then replays exactly those batches
   (same prompt ids, same sampling seeds) through ``engine.generate`` alone. Overhead =
   loop time / replay time - 1: prompt rendering, tokenization, action parsing, environment steps.
2. Weight sync: Megatron -> vLLM in-place reload of the whole model (``--bucket-mb`` buckets)
   vs a plain ``copy_`` of the same tensors into preallocated buffers, both timed here.

Prints one table; all ratios come from this run. Single process, CPU or GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from megatron_sdar.envs import make
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.tiny import build_tiny_qwen
    from megatron_sdar.rollout import (AgentLoop, AgentLoopConfig, EpisodeSpec, MegatronWeightSource,
                                       RolloutEngine, RolloutEngineConfig)
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.utils.distributed import destroy, init_process_group, initialize_megatron_parallel

    os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 100))
    init_process_group()
    initialize_megatron_parallel()
    work = tempfile.mkdtemp(prefix="bench_rollout_")
    heads = max(2, args.hidden // 64)
    model_dir = build_tiny_qwen(os.path.join(work, "model"), "qwen2", hidden_size=args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=heads,
                                num_key_value_heads=max(1, heads // 2), intermediate_size=2 * args.hidden)
    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(), hf_dir=model_dir)
    engine = RolloutEngine(model_dir, RolloutEngineConfig(max_model_len=1024))
    source = MegatronWeightSource(policy.model, arch, bucket_mb=args.bucket_mb)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # ---- 1. agent loop vs raw generate on the same prompts
    sent: list[tuple[list[list[int]], list[int]]] = []
    original_generate = engine.generate

    def recording_generate(prompts, sampling, seeds=None):
        sent.append(([list(p) for p in prompts], list(seeds or [])))
        return original_generate(prompts, sampling, seeds=seeds)

    # the benchmark's own workload, every field given: free-text actions, no pattern, 4 history pairs
    config = AgentLoopConfig(max_turns=args.turns, history_window=4, max_prompt_tokens=900,
                             max_response_tokens=args.response_tokens, temperature=1.0, action_pattern=None,
                             invalid_action_penalty=0.1, show_admissible_actions=True, action_format="text",
                             context_position="start", restate_task=False, step_timeout_s=60.0, seed=0,
                             progress=False)
    loop = AgentLoop(engine, tokenizer, config)
    engine.generate = recording_generate

    def specs():
        return [EpisodeSpec(make("household", seed=i // 4), group=i // 4, task_seed=i // 4, episode_id=i)
                for i in range(args.episodes)]

    loop.run(specs()[:4])  # warm-up
    loop_times, raw_times = [], []
    from megatron_sdar.rollout.engine import SamplingConfig
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.response_tokens)
    for _ in range(args.repeats):
        sent.clear()
        start = time.perf_counter()
        batch = loop.run(specs())
        loop_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for prompts, seeds in sent:
            original_generate(prompts, sampling, seeds=seeds)
        raw_times.append(time.perf_counter() - start)
    engine.generate = original_generate
    loop_s, raw_s = min(loop_times), min(raw_times)
    tokens = batch.num_response_tokens

    # ---- 2. weight sync vs memcpy of the same bytes
    sync_runs = [engine.sync_weights(source) for _ in range(args.repeats)]
    sync = min(sync_runs, key=lambda s: s.seconds)
    export_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _name, _tensor in source:
            pass
        export_times.append(time.perf_counter() - start)
    export_s = min(export_times)
    tensors = [t.clone() for _, t in source]
    buffers = [torch.empty_like(t) for t in tensors]
    copy_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for dst, src in zip(buffers, tensors):
            dst.copy_(src)
        copy_times.append(time.perf_counter() - start)
    copy_s = min(copy_times)
    engine.shutdown()
    destroy()

    rows = [
        ("episodes x turns", f"{args.episodes} x <= {args.turns}", ""),
        ("agent loop (s)", f"{loop_s:.3f}", f"{tokens / loop_s:.0f} tok/s"),
        ("raw generate, same prompts (s)", f"{raw_s:.3f}", f"{tokens / raw_s:.0f} tok/s"),
        ("agent-loop overhead", f"{100 * (loop_s / raw_s - 1):.1f} %", "target < 15 % on CPU"),
        ("weights synced (MB)", f"{sync.bytes / 1e6:.1f}", f"{sync.buckets} buckets of <= {args.bucket_mb:g} MB"),
        ("weight sync (s)", f"{sync.seconds:.4f}", f"{sync.gbytes_per_s:.2f} GB/s"),
        ("  of which Megatron export (s)", f"{export_s:.4f}", "TP/PP gather; the rest is vLLM's load"),
        ("memcpy of the same bytes (s)", f"{copy_s:.4f}", f"{sync.bytes / copy_s / 1e9:.2f} GB/s"),
        ("sync throughput / memcpy", f"{copy_s / sync.seconds:.3f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    device = "cuda" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"bench_rollout on {device}: Qwen2 hidden {args.hidden}, {args.layers} layers, "
          f"{sum(p.numel() for p in policy.unwrapped()[0].parameters()) / 1e6:.1f} M params")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
