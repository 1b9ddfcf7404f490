"""tools/convert_checkpoint.py end to end: HF -> Megatron -> HF is bit-exact (through torchrun and
plain python, across TP/PP layouts), the checkpoint loads at another layout with transformers'
logits, the exported directory runs in transformers and vLLM with the same greedy output, the CLI
refuses bad directories, and exporting stays within one layer's memory."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
TOOL = str(REPO / "tools" / "convert_checkpoint.py")
PROMPTS = ["go to countertop 1", "You are in the middle of a room.", "heat egg 1 with microwave 1"]


def _run_tool(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """The converter as a user runs it: plain python, or torchrun for several ranks."""
    launcher = [sys.executable, TOOL] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), TOOL]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([*launcher, *args, "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Qwen2 (vocab 515, 4 layers, untied) and Qwen3 (tied, QK-norm) through both conversions.

    Qwen2: torchrun TP=2 -> checkpoint (padded vocab 516) -> plain python TP=1 -> HF in 2 MB shards.
    Qwen3: plain python TP=1 -> checkpoint -> torchrun PP=2 -> HF.
    """
    from megatron_sdar.models.tiny import build_tiny_qwen

    root = tmp_path_factory.mktemp("convert")
    src = {
        "qwen2": build_tiny_qwen(root / "qwen2_hf", "qwen2", seed=11, vocab_size=515, num_hidden_layers=4),
        "qwen3": build_tiny_qwen(root / "qwen3_hf", "qwen3", seed=12),
    }
    timings = {}
    t0 = time.monotonic()
    _run_tool("hf-to-megatron", "--hf", str(src["qwen2"]), "--out", str(root / "qwen2_ckpt"), "--tp", "2", nproc=2)
    t1 = time.monotonic()
    _run_tool("megatron-to-hf", "--ckpt", str(root / "qwen2_ckpt"), "--out", str(root / "qwen2_back"),
              "--max-shard-size", str(2 / 1024))
    t2 = time.monotonic()
    _run_tool("hf-to-megatron", "--hf", str(src["qwen3"]), "--out", str(root / "qwen3_ckpt"))
    t3 = time.monotonic()
    _run_tool("megatron-to-hf", "--ckpt", str(root / "qwen3_ckpt"), "--out", str(root / "qwen3_back"),
              "--pp", "2", nproc=2)
    t4 = time.monotonic()
    timings = {"qwen2 hf->mcore torchrun tp2": t1 - t0, "qwen2 mcore->hf python": t2 - t1,
               "qwen3 hf->mcore python": t3 - t2, "qwen3 mcore->hf torchrun pp2": t4 - t3}
    print("\nconversion wall times (s, incl. process start): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {
        "root": root,
        "src": src,
        "ckpt": {k: root / f"{k}_ckpt" for k in src},
        "back": {k: root / f"{k}_back" for k in src},
    }


@pytest.mark.multiproc
def test_round_trip_is_bit_exact_and_complete(converted):
    for key in ("qwen2", "qwen3"):
        src, back = converted["src"][key], converted["back"][key]
        original, exported = _hf_tensors(src), _hf_tensors(back)
        assert sorted(original) == sorted(exported), key
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), (key, name)
        assert json.loads((back / "config.json").read_text())["vocab_size"] == \
            json.loads((src / "config.json").read_text())["vocab_size"]
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
            assert (back / name).read_bytes() == (src / name).read_bytes(), (key, name)
    # the 2 MB shard limit split qwen2 into several files with an index naming each tensor once
    index = json.loads((converted["back"]["qwen2"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(_hf_tensors(converted["src"]["qwen2"]))


def _load_checkpoint_and_forward(ckpts: dict, tokens: torch.Tensor) -> dict:
    from megatron_sdar.checkpoint.model import load_model_checkpoint, read_checkpoint_model_info
    from megatron_sdar.models.megatron_model import build_model
    from tests.test_models_qwen import _forward_logits

    out = {}
    for key, path in ckpts.items():
        arch = read_checkpoint_model_info(path).arch
        model = build_model(arch, initialize_weights=False)
        load_model_checkpoint(model, path)
        logits = _forward_logits(model, tokens)
        out[key] = None if logits is None else logits[..., : arch.vocab_size]
    return out


@pytest.mark.multiproc
def test_checkpoint_loads_at_another_layout_with_transformers_logits(converted):
    """qwen2 was saved at TP=2 (vocab padded to 516), qwen3 at TP=1: both load at PP=2."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    per_rank = run_distributed(_load_checkpoint_and_forward, world_size=2, tp=1, pp=2,
                               args=({k: str(v) for k, v in converted["ckpt"].items()}, tokens))
    for key in ("qwen2", "qwen3"):
        ref = AutoModelForCausalLM.from_pretrained(converted["src"][key], dtype=torch.float32)
        with torch.no_grad():
            expected = ref(tokens).logits
        diff = (per_rank[1][key] - expected).abs().max().item()
        assert per_rank[0][key] is None and diff < 1e-5, (key, diff)


def _greedy_vllm_and_transformers(exported: dict, originals: dict, max_tokens: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import gc

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    results = {}
    for key, model_dir in exported.items():
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
        llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        vllm_tokens = [list(o.outputs[0].token_ids) for o in outs]
        del llm, outs
        gc.collect()
        hf_tokens, logit_diffs = [], []
        exported_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        original_model = AutoModelForCausalLM.from_pretrained(originals[key], dtype=torch.float32)
        for ids in prompt_ids:
            out = original_model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                          min_new_tokens=max_tokens)
            hf_tokens.append(out[0, len(ids):].tolist())
            with torch.no_grad():
                a = exported_model(torch.tensor([ids])).logits
                b = original_model(torch.tensor([ids])).logits
            logit_diffs.append((a - b).abs().max().item())
        results[key] = {"vllm": vllm_tokens, "hf": hf_tokens, "exported_vs_original": max(logit_diffs)}
    return results


@pytest.mark.multiproc
def test_exported_directory_runs_in_transformers_and_vllm(converted):
    results = run_distributed(
        _greedy_vllm_and_transformers, world_size=1, init="none", timeout=600,
        args=({k: str(v) for k, v in converted["back"].items()},
              {k: str(v) for k, v in converted["src"].items()}, 10))[0]
    for key, res in results.items():
        assert all(len(t) == 10 for t in res["vllm"]), key
        assert res["vllm"] == res["hf"], key  # vLLM on the export == transformers on the original
        assert res["exported_vs_original"] == 0.0, key  # identical weights, identical logits


# --------------------------------------------------------------------------------------------
# CLI errors (no model is built: the checks run first; each error is one line on stderr)
# --------------------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_cli_refuses_missing_mismatched_and_non_empty_directories(converted, tmp_path):
    src2, ckpt2 = converted["src"]["qwen2"], converted["ckpt"]["qwen2"]
    cases = [
        (["hf-to-megatron", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")],
         r"--hf .*nope is not a directory"),
        (["hf-to-megatron", "--hf", str(tmp_path), "--out", str(tmp_path / "o2")], r"has no config.json"),
        (["hf-to-megatron", "--hf", str(src2), "--out", str(converted["back"]["qwen2"])],
         r"is not empty \(pass --force"),
        (["megatron-to-hf", "--ckpt", str(src2), "--out", str(tmp_path / "o3")],
         r"not a Megatron distributed checkpoint"),
        (["megatron-to-hf", "--ckpt", str(ckpt2), "--out", str(tmp_path / "o4"),
          "--hf-config", str(converted["src"]["qwen3"])], r"describes a different model"),
    ]
    for args, pattern in cases:
        _one_line_error(_run_tool(*args, check=False), pattern)
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


@pytest.mark.multiproc
def test_force_replaces_output_and_hf_config_supplies_assets(converted, tmp_path):
    """--force empties a non-empty output; --hf-config (same model) supplies config and tokenizer."""
    out = tmp_path / "forced"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _run_tool("megatron-to-hf", "--ckpt", str(converted["ckpt"]["qwen3"]), "--out", str(out), "--force",
              "--hf-config", str(converted["src"]["qwen3"]), "--dtype", "bfloat16")
    assert not (out / "stale.txt").exists()
    exported = _hf_tensors(out)
    original = _hf_tensors(converted["src"]["qwen3"])
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], original[n].bfloat16())
               for n in original)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------------
# nothing lost, nothing silent: nested --force, staging, checksums, non-finite weights, tokenizer
# --------------------------------------------------------------------------------------------
def _one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2 and stderr is exactly one line, the error: none of the libraries' import or build
    warnings ("Transformer Engine and Apex are not installed", torch's "No CUDA runtime is found",
    deprecations) come before it."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("convert_checkpoint: error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.multiproc
def test_force_never_deletes_a_directory_that_holds_the_input(converted, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000008"
    import shutil

    shutil.copytree(converted["ckpt"]["qwen3"], ckpt)
    (run / "metrics.jsonl").write_text('{"step": 8}\n')
    before = _tree(run)
    for out in (run, run / "checkpoints", ckpt / "export"):  # holds the input / lies inside it
        _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--force", check=False),
                        "contain one another; --force would delete the input")
    _one_line_error(_run_tool("hf-to-megatron", "--hf", str(converted["src"]["qwen3"]), "--out",
                              str(converted["src"]["qwen3"] / "mcore"), "--force", check=False), "contain one another")
    assert _tree(run) == before


@pytest.mark.multiproc
def test_failed_conversion_leaves_the_old_output_intact(converted, tmp_path):
    import shutil

    bad = tmp_path / "random_bytes"
    shutil.copytree(converted["ckpt"]["qwen3"], bad)
    shard = max(bad.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    out = tmp_path / "export"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier export")
    # the checksum catches it; with --no-verify the load itself fails: one line either way
    _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(bad), "--out", str(out), "--force", check=False),
                    f"{shard.name} does not match its xxh3_64 checksum")
    _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(bad), "--out", str(out), "--force", "--no-verify",
                              check=False), "could not read the checkpoint: ")
    assert _tree(out) == {"previous.txt": b"an earlier export"}
    assert not list(tmp_path.glob(".export.*"))  # no staging directory left behind


@pytest.mark.multiproc
@pytest.mark.slow  # refusals; the suite keeps the round trip
def test_corrupt_incomplete_and_nonfinite_checkpoints_are_refused(converted, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = converted["ckpt"]["qwen3"]
    same_size = tmp_path / "same_size"
    shutil.copytree(src, same_size)
    shard = max(same_size.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096  # 4 KiB of 0xFF, same size
    shard.write_bytes(bytes(data))
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    shard = max(truncated.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    unmarked = tmp_path / "unmarked"
    shutil.copytree(src, unmarked)
    (unmarked / "complete.json").unlink()
    for ckpt, pattern in ((same_size, "does not match its xxh3_64 checksum"), (truncated, "bytes, .* were written"),
                          (unmarked, "not a complete checkpoint: no complete.json")):
        _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), check=False),
                        pattern)
    # NaN weights with valid checksums: an HF model with a NaN tensor, converted to a checkpoint
    nan_hf = tmp_path / "nan_hf"
    shutil.copytree(converted["src"]["qwen3"], nan_hf)
    weights = load_file(str(nan_hf / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, :3] = float("nan")
    save_file(weights, str(nan_hf / "model.safetensors"), metadata={"format": "pt"})
    _run_tool("hf-to-megatron", "--hf", str(nan_hf), "--out", str(tmp_path / "nan_ckpt"))
    _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(tmp_path / "nan_ckpt"), "--out", str(tmp_path / "o"),
                              check=False), r"non-finite weights \(NaN/inf in 1 parameter\(s\), e.g. decoder.layers.0")
    assert not (tmp_path / "o").exists()
    _run_tool("megatron-to-hf", "--ckpt", str(tmp_path / "nan_ckpt"), "--out", str(tmp_path / "o"), "--no-verify")
    assert torch.isnan(_hf_tensors(tmp_path / "o")["model.layers.0.mlp.down_proj.weight"]).sum() == 3


@pytest.mark.multiproc
@pytest.mark.slow  # refusals; the suite keeps the round trip
def test_export_without_a_tokenizer_is_refused(converted, tmp_path):
    import shutil

    bare = tmp_path / "bare_hf"  # weights and config only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(converted["src"]["qwen3"] / name, bare / name)
    _run_tool("hf-to-megatron", "--hf", str(bare), "--out", str(tmp_path / "ckpt"))
    _one_line_error(_run_tool("megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                              check=False), "no tokenizer for .* pass --hf-config DIR .* or --no-tokenizer")
    _run_tool("megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--no-tokenizer")
    assert (tmp_path / "o" / "model.safetensors").is_file() and not (tmp_path / "o" / "tokenizer.json").exists()
    _run_tool("megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o2"),
              "--hf-config", str(converted["src"]["qwen3"]))
    assert (tmp_path / "o2" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------------
# memory: exporting holds at most one layer's full tensors beyond the model
# --------------------------------------------------------------------------------------------
MEM_CONFIG = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _export_with_memory_probe(config: dict, out_dir: str) -> dict:
    """Build a random model, then export it to HF files while measuring this process's peak RSS."""
    import torch.distributed as dist

    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_writer import write_hf_checkpoint
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    arch = QwenArchitecture.from_hf_config(config)
    model = build_model(arch)
    shapes = QwenWeightMapping(arch).hf_tensor_shapes()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    start = time.monotonic()
    pairs = iter_hf_weights(model, arch, target="first")
    if dist.get_rank() == 0:
        write_hf_checkpoint(pairs, shapes, out_dir, torch.float32, max_shard_bytes=128 * 1024**2)
    else:
        for _ in pairs:
            pass
    seconds = time.monotonic() - start
    peak = _rss_kib("VmHWM")
    return {"peak_extra_bytes": (peak - before) * 1024, "seconds": seconds}


@pytest.mark.multiproc
def test_export_memory_stays_within_one_layer(tmp_path, monkeypatch):
    # glibc would otherwise keep freed blocks of up to 32 MB in its heap and blur the RSS reading
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1024 * 1024))
    arch = QwenArchitecture.from_hf_config(MEM_CONFIG)
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    shapes = QwenWeightMapping(arch).hf_tensor_shapes()
    nbytes = {n: 4 * torch.Size(s).numel() for n, s in shapes.items()}
    layer_bytes = sum(b for n, b in nbytes.items() if n.startswith("model.layers.0."))
    model_bytes = sum(nbytes.values())
    results = run_distributed(_export_with_memory_probe, world_size=2, tp=2,
                              args=(MEM_CONFIG, str(tmp_path / "export")), timeout=300)
    written = sum(p.stat().st_size for p in (tmp_path / "export").glob("*.safetensors"))
    assert written >= model_bytes and len(list((tmp_path / "export").glob("*.safetensors"))) > 1
    for rank, res in enumerate(results):
        print(f"\nrank {rank}: export peak extra RSS {res['peak_extra_bytes'] / 2**20:.1f} MiB, one layer "
              f"{layer_bytes / 2**20:.1f} MiB, whole model {model_bytes / 2**20:.1f} MiB, {res['seconds']:.2f}s")
        assert res["peak_extra_bytes"] <= layer_bytes, (rank, res, layer_bytes)
