"""Benchmark the vocabulary-parallel objective against the naive and the peer way.

    bash tools/run.sh tools/bench_objective.py [--tokens 4096] [--vocab 151936] [--device cpu|cuda]

Each variant runs forward + backward in a fresh process (CPU) so its peak memory is its own:
peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU), minus the inputs and the gradient
of the student logits, reported in units of one fp32 logits tensor ``[tokens, vocab]``.
Variants:

* ``ours_logprobs_entropy``: :func:`vocab_parallel_logprobs_entropy` (chunked custom autograd);
* ``ours_reverse_kl``: :func:`vocab_parallel_divergence` (exact full-vocabulary reverse KL);
  both with the fused ``torch.compile`` kernels (the objective's ``kernel="compile"``; ``--eager``
  for the eager chunk kernels; one untimed warm-up call absorbs the compilation);
* ``triton_logprobs_entropy`` / ``triton_reverse_kl``: the same with the Triton kernels
  (``kernel="triton"``, :mod:`megatron_sdar.algo.triton_kernels`; GPU, or the interpreter with
  ``TRITON_INTERPRET=1``);
* ``megatron_cross_entropy``: Megatron-Core's ``vocab_parallel_cross_entropy`` (the plain
  vocab-parallel cross entropy that the trainer would otherwise use);
* ``naive_logprobs_entropy`` / ``naive_reverse_kl``: ``log_softmax`` of student (and teacher)
  in autograd.

On CPU the naive variants run under an address-space cap (``--naive-cap-gb``) so that running out
of memory is reported as ``OOM`` instead of inviting the kernel's OOM killer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("megatron_cross_entropy", "ours_logprobs_entropy", "ours_reverse_kl",
            "naive_logprobs_entropy", "naive_reverse_kl")
TRITON_VARIANTS = ("triton_logprobs_entropy", "triton_reverse_kl")  # GPU: --variants ...,triton_*


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant: str, tokens: int, vocab: int, device: str, repeats: int, eager: bool = False) -> dict:
    """One variant, timed; ``eager``: the ``ours_*`` variants with the eager chunk kernels."""
    import torch

    torch.manual_seed(0)
    needs_teacher = variant.endswith("reverse_kl")
    if device == "cpu":
        from megatron_sdar.utils.device import setup_device

        setup_device()
    student = torch.randn(tokens, vocab, device=device)
    teacher = torch.randn(tokens, vocab, device=device) if needs_teacher else None
    targets = torch.randint(0, vocab, (tokens,), device=device)
    logits_bytes = tokens * vocab * 4
    if variant == "megatron_cross_entropy":
        import torch.distributed as dist
        from megatron_sdar.utils.distributed import init_process_group, initialize_megatron_parallel

        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        init_process_group()
        initialize_megatron_parallel()
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_sdar.algo import vocab_parallel_divergence, vocab_parallel_logprobs_entropy

    kernel = "triton" if variant.startswith("triton") else "eager" if eager else "compile"

    def step():
        x = student.detach().requires_grad_(True)
        if variant == "megatron_cross_entropy":
            # Megatron's layout is [s, b, V]; its function modifies nothing we reuse
            loss = vocab_parallel_cross_entropy(x[:, None, :], targets[:, None]).sum()
        elif variant in ("ours_logprobs_entropy", "triton_logprobs_entropy"):
            lp, ent = vocab_parallel_logprobs_entropy(x, targets, kernel=kernel)
            loss = lp.sum() + 0.01 * ent.sum()
        elif variant in ("ours_reverse_kl", "triton_reverse_kl"):
            loss = vocab_parallel_divergence(x, teacher, "reverse_kl", kernel=kernel).sum()
        elif variant == "naive_logprobs_entropy":
            ls = torch.log_softmax(x.float(), -1)
            loss = ls.gather(-1, targets[:, None]).sum() - 0.01 * (ls.exp() * ls).sum()
        elif variant == "naive_reverse_kl":
            ls, lt = torch.log_softmax(x.float(), -1), torch.log_softmax(teacher.float(), -1)
            loss = (ls.exp() * (ls - lt)).sum()
        else:
            raise ValueError(variant)
        loss.backward()
        return x.grad

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()  # warm-up (compilation, allocator), not timed
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        grad = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del grad
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    extra = peak - base - logits_bytes  # the student-logits gradient is part of every variant
    return dict(variant=variant, seconds=min(times), extra_bytes=extra,
                extra_in_logits=extra / logits_bytes, logits_gb=logits_bytes / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--naive-cap-gb", type=float, default=20.0)
    parser.add_argument("--eager", action="store_true", help="our eager chunk kernels, not the fused ones")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        if args._child.startswith("naive") and args.device == "cpu":
            cap = int(args.naive_cap_gb * 2**30) + 8 * 2**30  # + the CUDA-build libraries' mappings
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            result = run_variant(args._child, args.tokens, args.vocab, args.device, args.repeats, args.eager)
        except (MemoryError, RuntimeError) as exc:
            if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                raise
            result = dict(variant=args._child, seconds=None, extra_bytes=None, extra_in_logits=None,
                          error="OOM")
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--device", args.device, "--repeats", str(args.repeats), "--naive-cap-gb",
               str(args.naive_cap_gb), "--_child", variant] + (["--eager"] if args.eager else [])
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            results.append(dict(variant=variant, error=f"exit {out.returncode}: {out.stderr.strip()[-300:]}"))
        else:
            results.append(json.loads(line[len("RESULT "):]))

    ce = next((r for r in results if r["variant"] == "megatron_cross_entropy" and r.get("seconds")), None)
    print(f"\ntokens={args.tokens} vocab={args.vocab} device={args.device} "
          f"kernels={'eager' if args.eager else 'fused'}; one fp32 logits tensor = "
          f"{args.tokens * args.vocab * 4 / 2**30:.2f} GiB")
    print(f"{'variant':<26}{'time s':>9}{'x CE time':>11}{'extra peak GiB':>16}{'x logits':>10}")
    for r in results:
        if r.get("seconds") is None:
            print(f"{r['variant']:<26}{r.get('error', 'failed'):>9}")
            continue
        ratio = r["seconds"] / ce["seconds"] if ce else float("nan")
        print(f"{r['variant']:<26}{r['seconds']:>9.3f}{ratio:>11.2f}{r['extra_bytes'] / 2**30:>16.2f}"
              f"{r['extra_in_logits']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, vocab=args.vocab, device=args.device, results=results), f, indent=1)


if __name__ == "__main__":
    main()
