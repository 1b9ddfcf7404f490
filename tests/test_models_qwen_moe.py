"""Qwen3-MoE on Megatron-Core: config mapping and errors, expert weight layout, logits equal to
transformers' at TP=1, EP=2 and TP=2 (experts split over expert-TP=2), the exporter bit-exact at
each layout (both targets, every expert on every rank), the HF writer round trip at EP=2,
``tools/convert_checkpoint.py`` both ways (its checkpoint loads resharded at EP=2), and
vLLM (CPU backend) greedy decoding of the exported model.

Two tiny models (hidden 256, 2 layers, heads of 64, larger init so routing is non-trivial):
``renorm`` (4 experts, top-2, ``norm_topk_prob=True`` like the released models, untied) and
``raw`` (8 experts, top-2, ``norm_topk_prob=False``, tied, vocab 515 padded at TP=2).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_sdar.models.architecture import MoESpec, QwenArchitecture, UnsupportedConfigError
from megatron_sdar.testing import run_distributed
from tests.test_models_qwen import _load_forward_export

BATCH, SEQ = 2, 12
LOGIT_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# fixtures: tiny random Qwen3-MoE models on disk and transformers' reference
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, str]:
    from megatron_sdar.models.tiny import build_tiny_qwen

    root = tmp_path_factory.mktemp("tiny_qwen_moe")
    return {
        "renorm": str(build_tiny_qwen(root / "renorm", "qwen3_moe", seed=21)),
        "raw": str(build_tiny_qwen(root / "raw", "qwen3_moe", seed=22, num_experts=8, norm_topk_prob=False,
                                   tie_word_embeddings=True, vocab_size=515)),
    }


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(17))


@pytest.fixture(scope="module")
def hf_reference(moe_models) -> dict[str, dict]:
    """transformers' fp32 logits, and which experts its routers picked (per layer)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for key, path in moe_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        picked: list[torch.Tensor] = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, res: picked.append(res[2]))
                 for layer in model.model.layers]
        with torch.no_grad():
            logits = model(_tokens()).logits
        for hook in hooks:
            hook.remove()
        out[key] = {"logits": logits, "experts_used": [sorted(set(p.flatten().tolist())) for p in picked],
                    "num_experts": model.config.num_experts}
    return out


def test_tiny_models_route_tokens_to_many_experts(hf_reference):
    """The comparisons below exercise real routing: in every layer at least 3/4 of the experts get
    tokens, on both expert-parallel ranks of the EP=2 layout (experts [0, E/2) and [E/2, E))."""
    for key, ref in hf_reference.items():
        n = ref["num_experts"]
        for layer, used in enumerate(ref["experts_used"]):
            assert len(used) >= 0.75 * n, (key, layer, used)
            assert min(used) < n // 2 <= max(used), (key, layer, used)


# --------------------------------------------------------------------------------------------
# config mapping (no processes)
# --------------------------------------------------------------------------------------------
def _qwen3_30b_a3b_config(**overrides) -> dict:
    """The shape of Qwen3-30B-A3B's config.json."""
    cfg = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001, "output_router_logits": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "hidden_act": "silu", "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "sliding_window": None,
    }
    cfg.update(overrides)
    return cfg


def test_qwen3_30b_a3b_config_maps_to_moe_architecture():
    arch = QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config())
    assert arch.moe == MoESpec(num_experts=128, num_experts_per_token=8, expert_ffn_hidden_size=768,
                               norm_topk_prob=True, router_aux_loss_coef=0.001)
    assert arch.qk_norm and not arch.qkv_bias and (arch.q_size, arch.kv_size) == (4096, 512)
    arch.check_tensor_parallel(4)
    arch.check_expert_parallel(ep=8, etp=1)
    arch.check_expert_parallel(ep=128, etp=4)
    with pytest.raises(UnsupportedConfigError, match="expert parallel size 3 must divide num_experts=128"):
        arch.check_expert_parallel(ep=3, etp=1)
    with pytest.raises(UnsupportedConfigError, match="expert tensor parallel size 5 must divide"):
        arch.check_expert_parallel(ep=1, etp=5)
    # transformers >= 5 writes num_local_experts; num_experts == 0 is a dense model (all MLPs dense)
    renamed = _qwen3_30b_a3b_config(num_local_experts=128)
    del renamed["num_experts"]
    assert QwenArchitecture.from_hf_config(renamed).moe == arch.moe
    assert QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config(num_experts=0)).moe is None
    dense = QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config(model_type="qwen3"))
    assert dense.moe is None
    dense.check_expert_parallel(ep=1, etp=4)  # Megatron sets etp = tp for dense models too
    with pytest.raises(UnsupportedConfigError, match="expert parallel size 2 needs a mixture-of-experts model"):
        dense.check_expert_parallel(ep=2, etp=1)


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 5632}, "Qwen2-MoE .* is not converted"),
    ({"decoder_sparse_step": 2}, r"dense MLP layers \(decoder_sparse_step=2"),
    ({"mlp_only_layers": [0, 47]}, r"mlp_only_layers=\[0, 47\]"),
    ({"shared_expert_intermediate_size": 512}, "shared experts are not supported"),
    ({"num_experts": None}, "lacks 'num_experts'"),
    ({"moe_intermediate_size": None}, "lacks 'moe_intermediate_size'"),
    ({"num_experts_per_tok": 129}, r"num_experts_per_tok=129 must be in \[1, num_experts=128\]"),
])
def test_unsupported_moe_configs_raise_clear_errors(overrides, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config(**overrides))


def test_transformer_config_reproduces_hf_routing():
    """Megatron's router settings: softmax in fp32, renormalised top-k <-> top-k then softmax, no
    aux loss, no token dropping; EP/ETP sizes land in the config."""
    from megatron_sdar.models.megatron_model import build_transformer_config
    from megatron_sdar.utils.device import cpu_shims_active

    arch = QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config())
    cfg = build_transformer_config(arch, tp=2, pp=2, ep=8, etp=1)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (128, 8, 768)
    assert cfg.moe_router_score_function == "softmax" and cfg.moe_router_dtype == "fp32"
    assert cfg.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the chosen logits
    assert cfg.moe_router_load_balancing_type == "none" and cfg.moe_aux_loss_coeff == 0.0
    assert cfg.moe_expert_capacity_factor is None and cfg.moe_shared_expert_intermediate_size is None
    assert (cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size) == (8, 1)
    assert cfg.moe_token_dispatcher_type == ("allgather" if cpu_shims_active() else "alltoall")
    raw = QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config(norm_topk_prob=False))
    raw_cfg = build_transformer_config(raw, tp=1, pp=1, ep=1, params_dtype=torch.float32)
    assert raw_cfg.moe_router_pre_softmax is True  # top-k of the full softmax, not renormalised
    assert raw_cfg.expert_tensor_parallel_size == 1  # defaults to tp without parallel state
    # opting into a load-balancing loss for training goes through the overrides
    aux = build_transformer_config(arch, tp=1, pp=1, ep=1, moe_router_load_balancing_type="aux_loss",
                                   moe_aux_loss_coeff=arch.moe.router_aux_loss_coef)
    assert aux.moe_aux_loss_coeff == 0.001
    with pytest.raises(UnsupportedConfigError, match="expert parallel size 3"):
        build_transformer_config(arch, tp=1, pp=1, ep=3)


def test_local_layer_spec_has_sequential_experts_and_cp_attention():
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_sdar.models.cp_attention import ContextParallelDotProductAttention
    from megatron_sdar.models.megatron_model import build_layer_spec

    spec = build_layer_spec(QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config()), use_transformer_engine=False)
    mlp = spec.submodules.mlp
    assert mlp.func is MoELayer and mlp.keywords["submodules"].experts.func is SequentialMLP
    assert spec.submodules.self_attention.submodules.core_attention is ContextParallelDotProductAttention


# --------------------------------------------------------------------------------------------
# expert weight layout (no processes)
# --------------------------------------------------------------------------------------------
def test_hf_tensor_names_equal_those_transformers_saves(moe_models):
    from safetensors import safe_open

    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    for key, path in moe_models.items():
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            saved = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        assert QwenWeightMapping(QwenArchitecture.from_hf_config(path)).hf_tensor_shapes() == saved, key


def test_both_megatron_expert_layouts_resolve_to_the_expert_rules():
    from megatron_sdar.models.weight_mapping import QwenWeightMapping, canonical_megatron_name, split_expert_name

    mapping = QwenWeightMapping(QwenArchitecture.from_hf_config(_qwen3_30b_a3b_config(num_hidden_layers=2)))
    assert split_expert_name("mlp.experts.local_experts.7.linear_fc1.weight") == ("mlp.experts.linear_fc1.weight", 7)
    assert split_expert_name("mlp.experts.linear_fc2.weight12") == ("mlp.experts.linear_fc2.weight", 12)
    assert split_expert_name("mlp.router.weight") == ("mlp.router.weight", None)
    fc1, layer = mapping.rule_for(canonical_megatron_name(
        "module.decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"), layer_offset=1)
    fc2, _ = mapping.rule_for("decoder.layers.0.mlp.experts.linear_fc2.weight3")
    router, _ = mapping.rule_for("decoder.layers.0.mlp.router.weight")
    assert layer == 1 and fc1.expert and fc2.expert and not router.expert
    assert fc1.hf_names_for(1, 42) == ("model.layers.1.mlp.experts.42.gate_proj.weight",
                                       "model.layers.1.mlp.experts.42.up_proj.weight")
    assert router.hf_names_for(1) == ("model.layers.1.mlp.gate.weight",) and router.hf_shapes == ((128, 2048),)
    with pytest.raises(ValueError, match="expert parameter"):
        fc1.hf_names_for(1)
    with pytest.raises(KeyError, match="no HF mapping"):
        mapping.rule_for("decoder.layers.0.mlp.linear_fc1.weight")  # no dense MLP in an MoE layer
    # expert-TP rank 1 of 2: the second half of expert 5's gate and up, then of down_proj's columns
    gate = torch.arange(768.0)[:, None].expand(768, 4)
    up = 1000 + gate
    down = torch.arange(768.0)[None, :].expand(4, 768)
    full = {"model.layers.0.mlp.experts.5.gate_proj.weight": gate, "model.layers.0.mlp.experts.5.up_proj.weight": up,
            "model.layers.0.mlp.experts.5.down_proj.weight": down}
    shard = mapping.shard_from_full(fc1, 0, full, 1, 2, torch.Size([768, 4]), expert=5)
    assert torch.equal(shard, torch.cat([gate[384:], up[384:]]))
    assert torch.equal(mapping.shard_from_full(fc2, 0, full, 1, 2, torch.Size([4, 384]), expert=5), down[:, 384:])


# --------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py both ways (EP=1: the tool has no --ep)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(moe_models, tmp_path_factory) -> dict:
    """``raw`` through the tool with plain python (HF -> Megatron -> HF, TP=1; a torchrun launch
    costs 20 s more here). The layouts test loads this checkpoint resharded to EP=2."""
    from tests.test_convert_checkpoint import _run_tool

    root = tmp_path_factory.mktemp("convert_moe")
    t0 = time.monotonic()
    _run_tool("hf-to-megatron", "--hf", moe_models["raw"], "--out", str(root / "ckpt"))
    t1 = time.monotonic()
    _run_tool("megatron-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "back"))
    print(f"\nqwen3_moe conversion (s, incl. process start): hf->mcore {t1 - t0:.1f}, "
          f"mcore->hf {time.monotonic() - t1:.1f}")
    return {"src": Path(moe_models["raw"]), "ckpt": root / "ckpt", "back": root / "back"}


@pytest.mark.multiproc
def test_convert_checkpoint_round_trip_is_bit_exact(converted):
    from tests.test_convert_checkpoint import _hf_tensors

    original, back = _hf_tensors(converted["src"]), _hf_tensors(converted["back"])
    assert sorted(original) == sorted(back)
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in original.items())
    config = json.loads((converted["back"] / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 8


# --------------------------------------------------------------------------------------------
# layouts against transformers (one launch each, both models)
# --------------------------------------------------------------------------------------------
def _moe_layout_check(model_dirs: dict, tokens: torch.Tensor, ckpt: str | None, write_dir: str | None) -> dict:
    """The dense test's load/forward/export check, plus (optionally) the writer round trip from
    ``target="first"`` and the logits of a checkpoint converted at another layout."""
    import torch.distributed as dist

    from megatron_sdar.checkpoint.model import load_model_checkpoint, read_checkpoint_model_info
    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.hf_writer import write_hf_checkpoint
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.models.weight_mapping import QwenWeightMapping
    from tests.test_models_qwen import _forward_logits

    results = _load_forward_export(model_dirs, tokens)
    if write_dir is not None:
        arch = QwenArchitecture.from_hf_config(model_dirs["renorm"])
        model = build_model(arch, initialize_weights=False)
        load_hf_weights(model, arch, model_dirs["renorm"])
        pairs = iter_hf_weights(model, arch, target="first")
        if dist.get_rank() == 0:  # a small shard limit: experts spread over several files
            write_hf_checkpoint(pairs, QwenWeightMapping(arch).hf_tensor_shapes(), write_dir, torch.float32,
                                max_shard_bytes=1 << 20)
        else:
            assert list(pairs) == []  # EP peers take part in the broadcasts, yield nothing
    if ckpt is not None:
        arch = read_checkpoint_model_info(ckpt).arch
        model = build_model(arch, initialize_weights=False)
        load_model_checkpoint(model, ckpt)
        logits = _forward_logits(model, tokens)
        results["ckpt_logits"] = logits[..., : arch.vocab_size]
    return results


LAYOUTS = [(1, 1, 1), (2, 1, 2), (2, 2, 1)]  # (world, tp, ep); expert-TP = tp


@pytest.mark.multiproc
@pytest.mark.parametrize("world,tp,ep", LAYOUTS, ids=[f"tp{t}_ep{e}" for _, t, e in LAYOUTS])
def test_megatron_moe_logits_match_transformers(request, moe_models, hf_reference, tmp_path, world, tp, ep):
    from tests.test_convert_checkpoint import _hf_tensors

    ckpt = write_dir = None
    if ep == 2:  # the EP layout also writes an HF directory and loads the converted (EP=1) checkpoint
        ckpt, write_dir = str(request.getfixturevalue("converted")["ckpt"]), str(tmp_path / "written")
    start = time.monotonic()
    per_rank = run_distributed(_moe_layout_check, world_size=world, tp=tp, ep=ep, timeout=300,
                               args=(moe_models, _tokens(), ckpt, write_dir))
    elapsed = time.monotonic() - start
    worst = {}
    for key, path in moe_models.items():
        expert_bytes = sum(t.numel() * t.element_size() for n, t in _hf_tensors(Path(path)).items()
                           if ".experts." in n)
        for res in (r[key] for r in per_rank):
            diff = (res["logits"] - hf_reference[key]["logits"]).abs().max().item()
            worst[key] = max(worst.get(key, 0.0), diff)
            assert diff <= LOGIT_TOL, f"{key} tp={tp} ep={ep}: max |logit diff| {diff:.3g}"
            assert res["padded_vocab"] % tp == 0
            # a rank reads its 1/tp of the dense tensors and 1/(ep*etp) of the experts (norms replicated)
            dense_bytes = res["file_bytes"] - expert_bytes
            assert res["bytes_read"] <= dense_bytes / tp + expert_bytes / (ep * tp) + 0.05 * res["file_bytes"]
            all_, first = res["exported"]["all"], res["exported"]["first"]
            assert all_["mismatched"] == [] and len(all_["names"]) == len(set(all_["names"]))
            if res["rank"] == 0:
                assert first["mismatched"] == [] and first["names"] == all_["names"]
            else:
                assert first["names"] == []
        arch = QwenArchitecture.from_hf_config(path)
        per_layer = 9 + 3 * arch.moe.num_experts  # norms 2, q/k/v/o 4, q/k-norm 2, router 1, experts
        assert len(per_rank[0][key]["exported"]["all"]["names"]) == \
            arch.num_layers * per_layer + 2 + (0 if arch.tie_word_embeddings else 1), key
    if ep == 2:
        written, original = _hf_tensors(tmp_path / "written"), _hf_tensors(Path(moe_models["renorm"]))
        assert sorted(written) == sorted(original)
        assert all(torch.equal(written[n], t) for n, t in original.items())
        assert len(list((tmp_path / "written").glob("*.safetensors"))) > 1
    if ckpt is not None:
        for res in per_rank:
            diff = (res["ckpt_logits"] - hf_reference["raw"]["logits"]).abs().max().item()
            worst["raw from tp1 checkpoint"] = max(worst.get("raw from tp1 checkpoint", 0.0), diff)
            assert diff <= LOGIT_TOL, diff
    print(f"\nqwen3_moe tp={tp} ep={ep} ({elapsed:.1f}s): max |megatron - transformers| logits: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


# --------------------------------------------------------------------------------------------
# vLLM (CPU backend) runs the exported Qwen3-MoE
# --------------------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_vllm_greedy_on_export_matches_transformers_on_original(converted):
    from tests.test_convert_checkpoint import _greedy_vllm_and_transformers

    res = run_distributed(_greedy_vllm_and_transformers, world_size=1, init="none", timeout=600,
                          args=({"raw": str(converted["back"])}, {"raw": str(converted["src"])}, 10))[0]["raw"]
    assert all(len(t) == 10 for t in res["vllm"])
    assert res["vllm"] == res["hf"] and res["exported_vs_original"] == 0.0


# --------------------------------------------------------------------------------------------
# GPU: Transformer Engine spec (TEGroupedMLP experts, alltoall dispatcher), no CPU shims
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_transformer_engine_moe_spec_matches_transformers_on_gpu(moe_models, hf_reference):
    res = run_distributed(_te_moe_check, world_size=1, args=(moe_models, _tokens()), timeout=600)[0]
    for key, r in res.items():
        assert r["grouped_names"] and r["export_exact"], (key, r)
        assert r["logit_diff"] <= LOGIT_TOL, (key, r)


def _te_moe_check(model_dirs: dict, tokens: torch.Tensor) -> dict:
    from safetensors.torch import load_file

    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model, transformer_engine_available
    from megatron_sdar.utils.device import causal_attention_mask

    assert transformer_engine_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    out = {}
    for key, path in model_dirs.items():
        arch = QwenArchitecture.from_hf_config(path)
        model = build_model(arch, use_transformer_engine=True, initialize_weights=False)
        assert model.config.moe_token_dispatcher_type == "alltoall" and model.config.moe_grouped_gemm
        names = [n for n, _ in model.named_parameters()]
        load_hf_weights(model, arch, path)
        original = load_file(f"{path}/model.safetensors")
        model.eval()
        seq = tokens.shape[1]
        with torch.no_grad():
            got = model(tokens.cuda(), torch.arange(seq, device="cuda").expand_as(tokens).contiguous(),
                        causal_attention_mask(seq, device="cuda"))[..., : arch.vocab_size].float().cpu()
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(tokens).logits
        out[key] = {
            "grouped_names": any(n.endswith("mlp.experts.linear_fc1.weight0") for n in names),
            "export_exact": all(torch.equal(t.cpu(), original[n]) for n, t in iter_hf_weights(model, arch)),
            "logit_diff": (got - ref).abs().max().item(),
        }
    return out
