"""The GPU check: every GPU-only path, run once, in one summary table (``tools/gpu_check.sh`` runs it).

    PYTHONPATH=. python tools/gpu_check.py [--out DIR] [--budget-s 420] [--allow-cpu]

Checks, each in its own process with its own time limit (a hang or a crash costs that check only):

* ``te_vs_local``: a tiny Qwen3 built with Transformer Engine's layer spec and with the local spec
  from the same HF weights, fp32 logits max |diff|;
* ``sdar_step_bf16`` / ``sdar_step_fp8``: one full SDAR step (teacher, reference, student passes,
  optimizer) through the main job's ``PolicyUpdate`` on a tiny model in bf16, and in FP8
  (tensorwise on Hopper, mxfp8 on Blackwell) from the same weights; loss, grad norm, and the FP8
  loss minus the bf16 loss;
* ``vllm``: the rollout engine on the GPU in bf16: generate, sleep, weight sync, wake up, generate
  again (same seeds: same tokens), and the train/infer log-prob difference of the synced weights;
* ``objective_bench``: ``tools/bench_objective.py --device cuda`` at 4,096 x 151,936 (ratios of
  our objective, eager and Triton kernels, to Megatron's cross entropy).

A check whose dependency is missing (Transformer Engine, vLLM) is reported as ``not run`` with the
reason, never as passed. ``--allow-cpu`` runs the same checks without a GPU (CPU shims, vLLM's CPU
backend), to test this script's wiring. The last stdout line is the table as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("te_vs_local", "sdar_step_bf16", "sdar_step_fp8", "vllm", "objective_bench")


class NotRun(Exception):
    """A check that cannot run here (missing dependency or hardware): reported, not failed."""


# ------------------------------------------------------------------------------------------------
# the checks (each runs in a child process)
# ------------------------------------------------------------------------------------------------
def _device(allow_cpu: bool):
    import torch

    from megatron_sdar.utils.distributed import init_process_group

    if not torch.cuda.is_available() and not allow_cpu:
        raise NotRun("no CUDA device")
    return init_process_group()


def _need_te() -> None:
    from megatron_sdar.models.megatron_model import transformer_engine_available

    if not transformer_engine_available():
        raise NotRun("Transformer Engine is not installed")


def _tiny(tmp: Path, kind: str = "qwen3") -> Path:
    """A tiny HF model (float32 on disk; each check picks its training / inference dtype)."""
    from megatron_sdar.models.tiny import build_tiny_qwen

    return build_tiny_qwen(tmp / kind, kind, num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2)


def check_te_vs_local(tmp: Path, allow_cpu: bool) -> dict:
    import torch

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.utils.device import causal_attention_mask, current_device
    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    _need_te()
    _device(allow_cpu)
    initialize_megatron_parallel()
    model_dir = _tiny(tmp)
    arch = QwenArchitecture.from_hf_config(model_dir)
    device = current_device()
    tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(64, device=device).expand_as(tokens)
    logits = {}
    for spec in ("te", "local"):
        model = build_model(arch, use_transformer_engine=spec == "te", initialize_weights=False)
        load_hf_weights(model, arch, model_dir)
        model.eval()
        with torch.no_grad():
            logits[spec] = model(tokens, positions, causal_attention_mask(64, device=device))[..., :arch.vocab_size].float()
    diff = float((logits["te"] - logits["local"]).abs().max())
    return {"ok": diff < 1e-3, "logits_max_abs_diff": diff}


def _samples(vocab: int, count: int = 8):
    import torch

    from megatron_sdar.trainer.batch import TrainingSample

    gen = torch.Generator().manual_seed(0)
    samples, contexts = [], []
    for i in range(count):
        prompt = torch.randint(3, vocab, (40,), generator=gen).tolist()
        response = torch.randint(3, vocab, (16,), generator=gen).tolist()
        contexts.append(torch.randint(3, vocab, (24,), generator=gen).tolist())
        samples.append(TrainingSample(prompt + response, len(prompt), (-2.0 * torch.rand(16, generator=gen)).tolist(),
                                      advantage=float(torch.randn(1, generator=gen)), episode=i // 2))
    return samples, contexts


def _sdar_step(model_dir: Path, fp8: str | None) -> dict:
    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.precision import resolve_precision
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.teacher import TeacherBatch
    from megatron_sdar.trainer.update import PolicyUpdate

    arch = QwenArchitecture.from_hf_config(model_dir)
    precision = resolve_precision("bfloat16", fp8)
    policy = build_policy(arch, OptimConfig(lr=1e-4, clip_grad=1.0), hf_dir=model_dir, precision=precision)
    updater = PolicyUpdate(policy, preset("sdar", kl_coef=0.01), micro_batch_size=4, pad_id=0,
                           reference_dir=lambda: model_dir)
    start = time.perf_counter()
    samples, contexts = _samples(arch.vocab_size)
    teacher = TeacherBatch.build(samples, updater.objective, lambda indices: [
        contexts[i] + samples[i].input_ids[:samples[i].response_start] for i in indices])
    metrics = updater.train_on(samples, step=0, teacher=teacher)
    return {"loss": metrics["actor/loss"], "grad_norm": metrics["actor/grad_norm"],
            "gate_mean": metrics["sdar/gate_mean"], "seconds": round(time.perf_counter() - start, 3)}


def check_sdar_step_bf16(tmp: Path, allow_cpu: bool) -> dict:
    import math

    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    _device(allow_cpu)
    initialize_megatron_parallel()
    result = _sdar_step(_tiny(tmp), None)
    return {"ok": math.isfinite(result["loss"]) and result["grad_norm"] > 0, **result}


def check_sdar_step_fp8(tmp: Path, allow_cpu: bool) -> dict:
    import torch

    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    _need_te()
    _device(allow_cpu)
    initialize_megatron_parallel()
    recipe = "tensorwise" if torch.cuda.get_device_capability() < (10, 0) else "mxfp8"
    model_dir = _tiny(tmp)
    bf16, fp8 = _sdar_step(model_dir, None), _sdar_step(model_dir, recipe)
    diff = fp8["loss"] - bf16["loss"]
    return {"ok": abs(diff) <= 0.05 * max(abs(bf16["loss"]), 1e-3), "recipe": recipe, "loss_bf16": bf16["loss"],
            "loss_fp8": fp8["loss"], "loss_diff": diff, "grad_norm_fp8": fp8["grad_norm"], "seconds": fp8["seconds"]}


def check_vllm(tmp: Path, allow_cpu: bool) -> dict:
    import importlib.util

    import torch

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.precision import resolve_precision
    from megatron_sdar.rollout.engine import RolloutEngine, RolloutEngineConfig, SamplingConfig
    from megatron_sdar.rollout.weight_sync import MegatronWeightSource
    from megatron_sdar.trainer.batch import TrainingSample
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate
    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    _device(allow_cpu)
    if importlib.util.find_spec("vllm") is None:
        raise NotRun("vLLM is not installed")
    initialize_megatron_parallel()
    on_gpu = torch.cuda.is_available() and not allow_cpu
    dtype = "bfloat16" if on_gpu else "float32"
    model_dir = _tiny(tmp, kind="qwen2")
    arch = QwenArchitecture.from_hf_config(model_dir)
    # the trainer's weights differ from the checkpoint's: the sync must carry them
    torch.manual_seed(7)
    precision = resolve_precision(dtype, None)
    policy = build_policy(arch, OptimConfig(), hf_dir=None, precision=precision)
    engine = RolloutEngine(model_dir, RolloutEngineConfig(max_model_len=256, gpu_memory_utilization=0.3,
                                                          dtype=dtype, seed=0, enforce_eager=True))
    try:
        prompts = [torch.randint(3, arch.vocab_size, (20,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(4)]
        sampling = SamplingConfig(temperature=1.0, max_tokens=16, seed=None)
        engine.sleep()
        slept = sorted(engine.sleeping)
        stats = engine.sync_weights(MegatronWeightSource(policy.model, arch))
        engine.wake_up()
        first = engine.generate(prompts, sampling, seeds=[11, 12, 13, 14])
        second = engine.generate(prompts, sampling, seeds=[11, 12, 13, 14])
        # the trainer's log-probs of the tokens vLLM sampled, from the synced weights
        samples = [TrainingSample(g.prompt_ids + g.token_ids, len(g.prompt_ids), g.logprobs, advantage=0.0, episode=i)
                   for i, g in enumerate(first)]
        updater = PolicyUpdate(policy, preset("grpo"), micro_batch_size=4, pad_id=0, reference_dir=lambda: model_dir)
        metrics = updater.train_on(samples, step=0)
    finally:
        engine.shutdown()
    same = all(a.token_ids == b.token_ids for a, b in zip(first, second))
    diff_mean = metrics["rollout/train_infer_logprob_diff_mean"]
    limit = 0.05 if dtype == "bfloat16" else 1e-3
    return {"ok": same and diff_mean < limit and (not on_gpu or slept == ["kv_cache", "weights"]),
            "dtype": dtype, "slept": ",".join(slept) or "(no sleep mode on CPU)", "sync_gbytes_per_s": stats.gbytes_per_s,
            "same_tokens_after_wake": same, "train_infer_logprob_diff_mean": diff_mean,
            "train_infer_logprob_diff_max": metrics["rollout/train_infer_logprob_diff_max"]}


def check_objective_bench(tmp: Path, allow_cpu: bool) -> dict:
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        raise NotRun("no CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab = (4096, 151936) if device == "cuda" else (256, 4096)
    variants = ["megatron_cross_entropy", "ours_logprobs_entropy", "ours_reverse_kl"]
    if device == "cuda":
        variants += ["triton_logprobs_entropy", "triton_reverse_kl"]
    out = tmp / "bench_objective.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_objective.py"), "--device", device,
                           "--tokens", str(tokens), "--vocab", str(vocab), "--repeats", "3",
                           "--variants", ",".join(variants),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_objective.py exited {proc.returncode}: {proc.stderr[-800:]}")
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    failed = [v for v in variants if not rows.get(v, {}).get("seconds")]
    if failed:
        raise RuntimeError(f"bench_objective.py variants without a time: {failed}")
    base = rows["megatron_cross_entropy"]["seconds"]
    ratios = {f"{v}_x_megatron_ce": round(rows[v]["seconds"] / base, 3) for v in variants[1:]}
    return {"ok": True, "shape": f"{tokens}x{vocab}", "megatron_ce_seconds": base, **ratios}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _child(name: str, allow_cpu: bool, result_file: Path) -> None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"status": "ran", **globals()[f"check_{name}"](Path(tmp), allow_cpu)}
    except NotRun as exc:
        result = {"status": "not run", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failed check is a row of the table
        import traceback

        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result_file.write_text(json.dumps(result, default=str))


def run_check(name: str, allow_cpu: bool, timeout_s: float, out_dir: Path) -> dict:
    result_file = out_dir / f"{name}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if allow_cpu:
        env["MEGATRON_SDAR_FORCE_CPU"] = "1"
    start = time.perf_counter()
    log = out_dir / f"{name}.log"
    with open(log, "w") as handle:
        try:
            subprocess.run([sys.executable, __file__, "--_child", name, "--out", str(out_dir)]
                           + (["--allow-cpu"] if allow_cpu else []), stdout=handle, stderr=subprocess.STDOUT,
                           env=env, timeout=timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s (log: {log})"}
    if not result_file.is_file():
        return {"status": "error", "reason": f"the check's process died without a result (log: {log})"}
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def _cell(result: dict) -> str:
    if result["status"] != "ran":
        return f"{result['status']}: {result.get('reason', '')}"
    verdict = "PASS" if result.get("ok") else "FAIL"
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in result.items() if k not in ("status", "ok", "wall_s", "traceback"))
    return f"{verdict}: {values}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="logs and results")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all checks together")
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (tests this script)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args._child:
        _child(args._child, args.allow_cpu, out_dir / f"{args._child}.json")
        return 0
    names = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    deadline = time.monotonic() + args.budget_s
    table = {}
    for i, name in enumerate(names):
        share = max(30.0, (deadline - time.monotonic()) / (len(names) - i))
        print(f"[{i + 1}/{len(names)}] {name} (limit {share:.0f} s)", flush=True)
        table[name] = run_check(name, args.allow_cpu, share, out_dir)
        print(f"    {_cell(table[name])}", flush=True)
    print("\n| check | result | seconds |\n| --- | --- | --- |")
    for name, result in table.items():
        print(f"| {name} | {_cell(result)} | {result.get('wall_s', '')} |")
    (out_dir / "summary.json").write_text(json.dumps(table, indent=1, default=str))
    print(json.dumps({name: {k: v for k, v in r.items() if k != "traceback"} for name, r in table.items()},
                     default=str))
    return 1 if any(r["status"] == "error" or (r["status"] == "ran" and not r.get("ok")) for r in table.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
