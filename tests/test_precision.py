"""Precision settings: dtype and FP8 recipe -> megatron-core config fields, DDP / optimizer / vLLM
arguments, every validation error (CPU, with the hardware probes injected), and on a GPU with
Transformer Engine one FP8 step against BF16."""
from __future__ import annotations

import pytest
import torch

from megatron_sdar.models.precision import FP8_RECIPES, FP8ConfigError, PrecisionSettings, resolve_precision

H100 = (9, 0)


def _resolve(fp8, capability=H100, te=True, dtype="bfloat16", **kwargs):
    return resolve_precision(dtype, fp8, te_available=lambda: te, capability=lambda: capability, **kwargs)


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_recipe_maps_to_megatron_fields(recipe):
    settings = _resolve(recipe, capability=(10, 0))
    kw = settings.transformer_config_kwargs()
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == recipe
    assert kw["fp8_param"] is False and kw["fp8_margin"] == 0  # BF16 parameters, FP32 master in the optimizer
    if recipe == "delayed":
        assert (kw["fp8_amax_history_len"], kw["fp8_amax_compute_algo"]) == (1024, "max")
    else:
        assert (kw["fp8_amax_history_len"], kw["fp8_amax_compute_algo"]) == (1, "most_recent")
    assert settings.ddp_config_kwargs() == {"grad_reduce_in_fp32": True, "fp8_param_gather": False}
    assert settings.optimizer_config_kwargs() == {"bf16": True, "fp16": False, "params_dtype": torch.bfloat16}
    assert settings.vllm_kwargs() == {"dtype": "bfloat16", "quantization": None}


def test_fields_exist_in_installed_megatron_core():
    """The names and allowed values match megatron-core's TransformerConfig / DDP config."""
    import dataclasses
    import typing

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    kw = _resolve("tensorwise").transformer_config_kwargs()
    assert set(kw) <= set(fields)
    assert set(FP8_RECIPES) <= set(typing.get_args(typing.get_args(fields["fp8_recipe"].type)[0]))
    assert "hybrid" in typing.get_args(typing.get_args(fields["fp8"].type)[0])
    assert "fp8_param_gather" in {f.name for f in dataclasses.fields(DistributedDataParallelConfig)}


def test_off_and_rollout_only():
    off = _resolve(None, te=False, capability=None, dtype="float32")
    assert not off.enabled and off.transformer_config_kwargs() == {}
    assert off.ddp_config_kwargs() == {"grad_reduce_in_fp32": True} and off.optimizer_config_kwargs()["bf16"] is False
    assert off.vllm_kwargs() == {"dtype": "float32", "quantization": None} and off.params_dtype == torch.float32
    assert _resolve("null").recipe is None
    rollout = _resolve(None, fp8_rollout=True)
    assert rollout.vllm_kwargs() == {"dtype": "bfloat16", "quantization": "fp8"} and not rollout.enabled
    settings = PrecisionSettings(dtype="bfloat16", recipe="delayed", amax_history_len=16)
    assert settings.transformer_config_kwargs()["fp8_amax_history_len"] == 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(fp8=None, dtype="float16"), "model.dtype must be one of float32, bfloat16"),
    (dict(fp8="e4m3"), "is not a recipe; use one of delayed, tensorwise, blockwise, mxfp8"),
    (dict(fp8="tensorwise", dtype="float32"), "needs model.dtype=bfloat16"),
    (dict(fp8="delayed", te=False), "needs Transformer Engine"),
    (dict(fp8="delayed", capability=None), "needs a CUDA GPU"),
    (dict(fp8="tensorwise", capability=(8, 0)), r"compute capability >= 8.9, this GPU has 8.0"),
    (dict(fp8="blockwise", capability=(8, 9)), r">= 9.0, this GPU has 8.9"),
    (dict(fp8="mxfp8", capability=H100), "MXFP8 is Blackwell-only"),
    (dict(fp8=None, fp8_rollout=True, capability=(8, 0)), "vLLM's FP8 kernels"),
])
def test_errors(kwargs, message):
    with pytest.raises(FP8ConfigError, match=message):
        _resolve(**kwargs)


def test_hardware_checks_can_be_skipped_and_real_probe_on_cpu():
    assert _resolve("mxfp8", te=False, capability=None, check_hardware=False).recipe == "mxfp8"
    if not torch.cuda.is_available():
        with pytest.raises(FP8ConfigError, match="Transformer Engine|CUDA GPU"):
            resolve_precision("bfloat16", "tensorwise")  # the real probes: no TE / no GPU in the CPU environment


@pytest.mark.gpu
def test_fp8_step_matches_bf16_on_gpu():
    """One forward/backward of a tiny TE model in BF16 and in FP8 (tensorwise) from the same weights:
    the losses agree within FP8 rounding."""
    from megatron_sdar.testing import run_distributed

    losses = run_distributed(_bf16_vs_fp8_losses, world_size=1, timeout=600)[0]
    assert abs(losses["fp8"] - losses["bf16"]) < 0.05 * abs(losses["bf16"]), losses


def _bf16_vs_fp8_losses() -> dict:
    import torch.nn.functional as F

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.models.tiny import tiny_qwen_config
    from megatron_sdar.utils.device import causal_attention_mask

    settings = resolve_precision("bfloat16", "tensorwise" if torch.cuda.get_device_capability() < (10, 0) else "mxfp8")
    cfg = tiny_qwen_config("qwen3", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    arch = QwenArchitecture.from_hf_config({**cfg.to_dict(), "torch_dtype": "bfloat16"})
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 65), generator=gen).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(64, device="cuda").expand(2, 64)
    mask = causal_attention_mask(64, device="cuda")
    out = {}
    state = None
    for name, kwargs in (("bf16", {}), ("fp8", settings.transformer_config_kwargs())):
        torch.manual_seed(0)
        model = build_model(arch, use_transformer_engine=True, **kwargs).cuda()
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        else:
            model.load_state_dict(state, strict=False)
        logits = model(inputs, pos, mask)
        loss = F.cross_entropy(logits.float()[..., :512].reshape(-1, 512), labels.reshape(-1))
        loss.backward()
        out[name] = loss.item()
    return out
