"""Context parallelism on CPU: :class:`ContextParallelDotProductAttention` alone against a float64
softmax-attention reference (causal, GQA, TP), and a tiny Qwen3 GPTModel (GQA 8/2 heads, QK-norm,
tied embeddings) whose logits and parameter gradients at CP=2, TP=2 x CP=2 and CP=4 equal those
at CP=1.

One 4-rank launch runs every check (each spawned rank costs seconds of imports); it switches
Megatron's parallel layout in place between checks. The test functions assert on its results.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_sdar.testing import run_distributed

BATCH, SEQ = 2, 16  # SEQ: a multiple of 2 * cp for cp = 1, 2, 4
LOGIT_TOL = 1e-5
GRAD_REL_TOL = 1e-5  # max |grad diff| / max |reference grad|, per tensor
MODULE_TOL = 1e-5  # fp32 module vs float64 reference
MODEL_LAYOUTS = [(1, 2), (2, 2), (1, 4)]  # (tp, cp), each compared with (1, 1)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> str:
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("cp_qwen3") / "qwen3", "qwen3", seed=11,
                               num_attention_heads=8))


@pytest.fixture(scope="module")
def cp_results(tiny_qwen3) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=gen)
    return run_distributed(_all_checks, world_size=4, args=(tiny_qwen3, tokens), timeout=300)


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def _set_layout(tp: int, cp: int) -> None:
    from megatron.core import parallel_state

    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    parallel_state.destroy_model_parallel()
    initialize_megatron_parallel(tp=tp, cp=cp)


def _attention_config(cp: int, tp: int, heads: int, groups: int, head_dim: int):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim, tensor_model_parallel_size=tp, context_parallel_size=cp,
        attention_dropout=0.0, masked_softmax_fusion=False, use_cpu_initialization=True,
    )


def _reference_attention(q, k, v):
    """float64 causal softmax attention; q ``[S, b, np, hn]``, k/v ``[S, b, ng, hn]``."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    seq = q.shape[0]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    context = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return context.reshape(seq, q.shape[1], -1)


def _module_check(tp: int, cp: int, heads: int = 8, groups: int = 2, head_dim: int = 16) -> dict:
    """Module output and q/k/v gradients vs the float64 reference (mask None and global mask)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.models.cp_attention import ContextParallelDotProductAttention
    from megatron_sdar.utils.device import causal_attention_mask
    from megatron_sdar.utils.distributed import cp_token_indices

    _set_layout(tp, cp)
    gen = torch.Generator().manual_seed(5)  # the same global tensors on every rank
    q = torch.randn(SEQ, BATCH, heads, head_dim, generator=gen)
    k = torch.randn(SEQ, BATCH, groups, head_dim, generator=gen)
    v = torch.randn(SEQ, BATCH, groups, head_dim, generator=gen)
    upstream = torch.randn(SEQ, BATCH, heads * head_dim, generator=gen)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = _reference_attention(q64, k64, v64)
    ref.backward(upstream.double())

    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    idx = cp_token_indices(SEQ, cp, cp_rank)
    hq = slice(tp_rank * heads // tp, (tp_rank + 1) * heads // tp)  # this TP rank's heads
    hk = slice(tp_rank * groups // tp, (tp_rank + 1) * groups // tp)
    hidden = slice(hq.start * head_dim, hq.stop * head_dim)
    attn = ContextParallelDotProductAttention(
        _attention_config(cp, tp, heads, groups, head_dim), layer_number=1,
        attn_mask_type=AttnMaskType.causal, attention_type="self")

    def shard(t: torch.Tensor, heads_slice: slice, rows=idx) -> torch.Tensor:
        return t[rows][:, :, heads_slice].clone()

    errors = {}
    for label, mask in (("mask_none", None), ("mask_global", causal_attention_mask(SEQ, device="cpu"))):
        local = [shard(t, h).requires_grad_() for t, h in ((q, hq), (k, hk), (v, hk))]
        out = attn(*local, mask)
        out.backward(upstream[idx][:, :, hidden])
        errors[label] = {
            "out": (out.double() - ref.detach()[idx][:, :, hidden]).abs().max().item(),
            **{name: (t.grad.double() - shard(full.grad, h)).abs().max().item()
               for name, t, full, h in (("dq", local[0], q64, hq), ("dk", local[1], k64, hk),
                                         ("dv", local[2], v64, hk))},
        }
    if cp > 1:
        odd = idx[:-1]
        bad_calls = {
            "odd_local_length": ([shard(t, h, odd) for t, h in ((q, hq), (k, hk), (v, hk))], None),
            "local_square_mask": ([shard(t, h) for t, h in ((q, hq), (k, hk), (v, hk))],
                                  causal_attention_mask(len(idx), device="cpu")),
        }
        for label, (qkv, mask) in bad_calls.items():
            try:
                attn(*qkv, mask)
                errors[label] = "no error"
            except ValueError as exc:
                errors[label] = str(exc)
    return errors


def _exactness_at_cp1() -> bool:
    """At CP=1 the module gives bit-identical outputs and gradients to Megatron's class."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.models.cp_attention import ContextParallelDotProductAttention
    from megatron_sdar.utils.device import causal_attention_mask

    _set_layout(1, 1)
    gen = torch.Generator().manual_seed(9)
    qkv = [torch.randn(SEQ, BATCH, h, 16, generator=gen) for h in (8, 2, 2)]
    results = []
    for cls in (DotProductAttention, ContextParallelDotProductAttention):
        module = cls(_attention_config(1, 1, 8, 2, 16), layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = module(*inputs, causal_attention_mask(SEQ, device="cpu"))
        out.sum().backward()
        results.append([out.detach(), *(t.grad for t in inputs)])
    return all(torch.equal(a, b) for a, b in zip(*results))


def _hf_gradients(model, arch) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) parameter gradients under their HF names, via the weight exporter."""
    from megatron_sdar.models.exporter import iter_hf_weights

    params = list(model.parameters())
    weights = [p.data for p in params]
    for p in params:
        p.data = p.grad
    try:
        return {name: t.clone() for name, t in iter_hf_weights(model, arch, target="all")}
    finally:
        for p, w in zip(params, weights):
            p.data = w


def _model_run(path: str, tokens: torch.Tensor, tp: int, cp: int, global_mask: bool):
    """Global logits and HF-named gradients of ``sum(logits * W)`` for one (tp, cp) layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.utils.device import causal_attention_mask
    from megatron_sdar.utils.distributed import cp_token_indices

    _set_layout(tp, cp)
    arch = QwenArchitecture.from_hf_config(path)
    model = build_model(arch, initialize_weights=False)
    assert model.config.context_parallel_size == cp
    load_hf_weights(model, arch, path)
    cp_rank, cp_group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
    idx = cp_token_indices(SEQ, cp, cp_rank)
    mask = causal_attention_mask(SEQ, device="cpu") if global_mask or cp == 1 else None
    logits = model(tokens[:, idx], idx.expand(BATCH, -1), mask)  # [b, s, V/tp]
    logits = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]
    weights = torch.randn(BATCH, SEQ, arch.vocab_size, generator=torch.Generator().manual_seed(4))
    (logits * weights[:, idx]).sum().backward()
    # what Megatron's DDP and finalize_model_grads do: sum over the data x context group, and
    # over TP for the QK-norm weights (each TP rank saw only its heads)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=cp_group)
        if "q_layernorm" in name or "k_layernorm" in name:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    local = logits.detach().contiguous()
    gathered = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(gathered, local, group=cp_group)
    full = torch.empty(BATCH, SEQ, arch.vocab_size)
    for rank, part in enumerate(gathered):
        full[:, cp_token_indices(SEQ, cp, rank)] = part
    return full, _hf_gradients(model, arch)


def _all_checks(path: str, tokens: torch.Tensor) -> dict:
    out: dict = {"cp1_exact": _exactness_at_cp1()}
    out["module"] = {f"tp{tp}_cp{cp}": _module_check(tp, cp) for tp, cp in ((1, 4), (2, 2), (1, 1))}
    ref_logits, ref_grads = _model_run(path, tokens, 1, 1, True)
    out["model"] = {}
    for i, (tp, cp) in enumerate(MODEL_LAYOUTS):
        logits, grads = _model_run(path, tokens, tp, cp, global_mask=i % 2 == 0)
        assert grads.keys() == ref_grads.keys()
        rel = {n: ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n, g in grads.items()}
        worst = max(rel, key=rel.get)
        out["model"][f"tp{tp}_cp{cp}"] = {
            "logits": (logits - ref_logits).abs().max().item(),
            "grad_rel": rel[worst], "worst_grad": worst, "n_grads": len(rel),
            "grad_norm_rel": abs(math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
                                 / math.sqrt(sum(g.double().square().sum().item() for g in ref_grads.values()))
                                 - 1.0),
        }
    return out


# --------------------------------------------------------------------------------------------
# assertions (parent side)
# --------------------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_module_matches_float64_causal_gqa_reference(cp_results):
    """CP=4, TP=2 x CP=2 and CP=1: output and q/k/v gradients (k/v reduce-scattered back to their
    owners) equal float64 causal attention with 8 query heads over 2 KV groups."""
    assert all(r["cp1_exact"] for r in cp_results)
    worst = 0.0
    for rank, res in enumerate(cp_results):
        for layout, checks in res["module"].items():
            for mask_kind in ("mask_none", "mask_global"):
                for name, err in checks[mask_kind].items():
                    worst = max(worst, err)
                    assert err < MODULE_TOL, (rank, layout, mask_kind, name, err)
    print(f"\nmodule vs float64: max abs error {worst:.2e}")


@pytest.mark.multiproc
def test_module_rejects_bad_lengths_and_local_masks(cp_results):
    for res in cp_results:
        for layout in ("tp1_cp4", "tp2_cp2"):
            checks = res["module"][layout]
            assert "multiple of 2 * cp_size" in checks["odd_local_length"], checks["odd_local_length"]
            assert "attention_mask must be None" in checks["local_square_mask"], checks["local_square_mask"]
    from megatron_sdar.utils.distributed import cp_token_indices

    with pytest.raises(ValueError, match="multiple of 2 \\* cp_size = 4"):
        cp_token_indices(10, 2, 0)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [f"tp{tp}_cp{cp}" for tp, cp in MODEL_LAYOUTS])
def test_gpt_model_logits_and_grads_match_cp1(cp_results, layout):
    for rank, res in enumerate(cp_results):
        r = res["model"][layout]
        assert r["logits"] <= LOGIT_TOL, (rank, layout, r)
        assert r["grad_rel"] <= GRAD_REL_TOL, (rank, layout, r)
        assert r["grad_norm_rel"] <= GRAD_REL_TOL, (rank, layout, r)
        assert r["n_grads"] == 2 * 11 + 2  # every HF tensor of the 2-layer tied Qwen3
    r = cp_results[0]["model"][layout]
    print(f"\n{layout}: max |logit diff| {r['logits']:.2e}, max rel grad diff {r['grad_rel']:.2e} "
          f"({r['worst_grad']}), grad norm rel diff {r['grad_norm_rel']:.2e}")
