"""Qwen2 / Qwen3 on Megatron-Core: config mapping, weight layout, and logits equal to transformers'
at TP=1, TP=2, PP=2 and TP=2 x PP=2 (gloo, fp32), plus the exporter at each of those layouts."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError
from megatron_sdar.testing import run_distributed

BATCH, SEQ = 2, 12
LOGIT_TOL = 1e-5


# --------------------------------------------------------------------------------------------
# fixtures: tiny random HF models on disk
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Qwen2: QKV bias, untied, vocab 515 (padded at TP=2), 4 layers (2 per PP stage).
    Qwen3: QK-norm, tied, 8 heads x 64 != hidden 256 (kv_channels path), 2 KV heads.
    Rope variants (TP=1 only): Qwen2 with linear scaling, Qwen3 with YaRN."""
    from megatron_sdar.models.tiny import build_tiny_qwen

    root = tmp_path_factory.mktemp("tiny_qwen")
    return {
        "qwen2": str(build_tiny_qwen(root / "qwen2", "qwen2", seed=1, vocab_size=515, num_hidden_layers=4)),
        "qwen3": str(build_tiny_qwen(root / "qwen3", "qwen3", seed=2, num_attention_heads=8)),
        "qwen2_linear_rope": str(build_tiny_qwen(
            root / "qwen2_linear", "qwen2", seed=3,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})),
        "qwen3_yarn": str(build_tiny_qwen(
            root / "qwen3_yarn", "qwen3", seed=4, max_position_embeddings=2048,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                             "rope_theta": 10000.0})),
    }


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_logits(tiny_models):
    """transformers' fp32 logits of every tiny model on the same tokens (the reference)."""
    from transformers import AutoModelForCausalLM

    out = {}
    with torch.no_grad():
        for key, path in tiny_models.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            out[key] = model(_tokens()).logits
    return out


# --------------------------------------------------------------------------------------------
# config mapping (no processes)
# --------------------------------------------------------------------------------------------
def _qwen2_config(**overrides) -> dict:
    cfg = {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "hidden_act": "silu",
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "sliding_window": 131072,
    }
    cfg.update(overrides)
    return cfg


def test_qwen25_7b_style_config_maps_to_expected_architecture():
    arch = QwenArchitecture.from_hf_config(_qwen2_config())
    assert (arch.head_dim, arch.heads_per_group, arch.q_size, arch.kv_size) == (128, 7, 3584, 512)
    assert arch.qkv_bias and not arch.qk_norm and not arch.tie_word_embeddings
    assert arch.rope.kind == "default" and arch.rope.theta == 1e6
    assert arch.torch_dtype == "bfloat16"
    assert arch.padded_vocab_size(8) == 151936  # already a multiple of 8
    assert arch.padded_vocab_size(3) == 151938
    assert arch.padded_vocab_size(2, multiple=128) == 152064
    arch.check_tensor_parallel(4)
    with pytest.raises(UnsupportedConfigError, match="tensor parallel size 8 must divide num_key_value_heads=4"):
        arch.check_tensor_parallel(8)


def test_qwen3_config_with_legacy_rope_scaling_and_explicit_head_dim():
    cfg = _qwen2_config(model_type="qwen3", hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    arch = QwenArchitecture.from_hf_config(cfg)
    assert arch.qk_norm and not arch.qkv_bias and arch.tie_word_embeddings
    assert (arch.q_size, arch.kv_size) == (2048, 1024)  # q_size != hidden_size
    assert (arch.rope.kind, arch.rope.factor, arch.rope.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert QwenArchitecture.from_hf_config({**cfg, "attention_bias": True}).qkv_bias


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "qwen2_moe"}, "Qwen2-MoE"),
    ({"model_type": "llama"}, "model_type='llama' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 0.8}}, "attention_factor"),
    ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads=5"),
    ({"torch_dtype": "float8_e4m3fn"}, "dtype='float8_e4m3fn'"),
    ({"vocab_size": None}, "lacks 'vocab_size'"),
])
def test_unsupported_config_values_raise_clear_errors(overrides, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        QwenArchitecture.from_hf_config(_qwen2_config(**overrides))


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face config.json"):
        QwenArchitecture.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_qwen2_config()))
    assert QwenArchitecture.from_hf_config(tmp_path).num_layers == 28


def test_transformer_config_fields():
    """CPU-checkable part of the model build: every Qwen knob lands in Megatron's config."""
    import torch.nn.functional as F

    from megatron_sdar.models.megatron_model import build_transformer_config

    arch = QwenArchitecture.from_hf_config(_qwen2_config(num_hidden_layers=4))
    cfg = build_transformer_config(arch, tp=4, pp=2)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 3584, 18944)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (28, 4, 128)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and not cfg.qk_layernorm
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (4, 2)
    yarn = QwenArchitecture.from_hf_config(_qwen2_config(
        model_type="qwen3", head_dim=128, rope_scaling={"type": "yarn", "factor": 4.0}))
    ycfg = build_transformer_config(yarn, tp=1, pp=1, params_dtype=torch.float32)
    assert ycfg.qk_layernorm and not ycfg.add_qkv_bias
    assert (ycfg.yarn_rotary_scaling_factor, ycfg.yarn_original_max_position_embeddings) == (4.0, 32768)
    with pytest.raises(ValueError, match="not divisible by pipeline size 3"):
        build_transformer_config(arch, tp=1, pp=3)


def test_local_layer_spec_without_transformer_engine_and_te_name_aliases():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_sdar.models.megatron_model import build_layer_spec, transformer_engine_available
    from megatron_sdar.models.weight_mapping import canonical_megatron_name

    arch = QwenArchitecture.from_hf_config(_qwen2_config(model_type="qwen3", head_dim=128))
    assert not transformer_engine_available()  # the CPU environment has no TE
    spec = build_layer_spec(arch)
    assert spec.submodules.input_layernorm is WrappedTorchNorm
    assert spec.submodules.self_attention.submodules.q_layernorm is WrappedTorchNorm
    with pytest.raises(RuntimeError, match="Transformer Engine is not importable"):
        build_layer_spec(arch, use_transformer_engine=True)
    assert canonical_megatron_name("module.module.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") \
        == "decoder.layers.3.input_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") \
        == "decoder.layers.0.pre_mlp_layernorm.weight"


# --------------------------------------------------------------------------------------------
# weight layout arithmetic (no processes)
# --------------------------------------------------------------------------------------------
def _small_arch(**overrides) -> QwenArchitecture:
    cfg = _qwen2_config(hidden_size=8, intermediate_size=6, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=2, num_hidden_layers=1, vocab_size=5)
    cfg.update(overrides)
    return QwenArchitecture.from_hf_config(cfg)


def test_qkv_layout_is_grouped_per_kv_head_and_sharded_by_groups():
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    arch = _small_arch()  # 4 query heads, 2 kv heads, head_dim 2 -> g = 2
    mapping = QwenWeightMapping(arch)
    # label every row with (tensor, head): q rows 0..7 -> 100+row, k -> 200+row, v -> 300+row
    q = (100 + torch.arange(8.0))[:, None].expand(8, 8)
    k = (200 + torch.arange(4.0))[:, None].expand(4, 8)
    v = (300 + torch.arange(4.0))[:, None].expand(4, 8)
    fused = mapping.fuse_qkv(q, k, v)[:, 0].tolist()
    assert fused == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    qs, ks, vs = mapping.split_qkv(mapping.fuse_qkv(q, k, v))
    assert torch.equal(qs, q) and torch.equal(ks, k) and torch.equal(vs, v)
    full = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
            "model.layers.0.self_attn.v_proj.weight": v}
    rule = mapping.layer_rules["self_attention.linear_qkv.weight"]
    shard1 = mapping.shard_from_full(rule, 0, full, tp_rank=1, tp=2, local_shape=torch.Size([8, 8]))
    assert shard1[:, 0].tolist() == [104, 105, 106, 107, 202, 203, 302, 303]  # the second kv group


def test_gate_up_shards_hold_gate_then_up_of_their_slice():
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    mapping = QwenWeightMapping(_small_arch())
    gate = (10 + torch.arange(6.0))[:, None].expand(6, 8)
    up = (20 + torch.arange(6.0))[:, None].expand(6, 8)
    full = {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up}
    rule = mapping.layer_rules["mlp.linear_fc1.weight"]
    shards = [mapping.shard_from_full(rule, 0, full, r, 2, torch.Size([6, 8]))[:, 0].tolist() for r in range(2)]
    assert shards == [[10, 11, 12, 20, 21, 22], [13, 14, 15, 23, 24, 25]]


def test_vocab_padding_rows_are_zero_and_row_parallel_splits_columns():
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    arch = _small_arch()  # vocab 5 -> padded 6 at TP=2
    mapping = QwenWeightMapping(arch)
    emb = torch.arange(40.0).reshape(5, 8)
    rule = mapping.embedding_rule
    last = mapping.shard_from_full(rule, None, {"model.embed_tokens.weight": emb}, 1, 2, torch.Size([3, 8]))
    assert torch.equal(last[:2], emb[3:]) and torch.equal(last[2], torch.zeros(8))
    o_proj = torch.arange(64.0).reshape(8, 8)
    rule = mapping.layer_rules["self_attention.linear_proj.weight"]
    right = mapping.shard_from_full(rule, 0, {"model.layers.0.self_attn.o_proj.weight": o_proj}, 1, 2,
                                    torch.Size([8, 4]))
    assert torch.equal(right, o_proj[:, 4:])
    with pytest.raises(ValueError, match="checkpoint and model config disagree"):
        mapping.shard_from_full(rule, 0, {"model.layers.0.self_attn.o_proj.weight": o_proj}, 1, 2,
                                torch.Size([8, 3]))


def test_expected_hf_tensors_equal_those_transformers_saves(tiny_models):
    from safetensors import safe_open

    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    for key in ("qwen2", "qwen3"):
        arch = QwenArchitecture.from_hf_config(tiny_models[key])
        with safe_open(f"{tiny_models[key]}/model.safetensors", "pt") as f:
            saved = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        assert QwenWeightMapping(arch).hf_tensor_shapes() == saved, key


# --------------------------------------------------------------------------------------------
# TP/PP layouts against transformers (one launch per layout, both architectures)
# --------------------------------------------------------------------------------------------
def _forward_logits(model, tokens: torch.Tensor):
    """Logits through Megatron's pipeline schedule; full vocabulary on the last stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_sdar.utils.device import causal_attention_mask

    device = next(model.parameters()).device  # CPU here, CUDA on a GPU machine
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=device).expand(batch, seq)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, causal_attention_mask(seq, device=device))

        def collect(out):
            if not ps.is_pipeline_last_stage():
                return out, {}
            return out.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(out).detach().cpu()}

        return output, collect

    model.eval()
    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
        seq_length=seq, micro_batch_size=batch, forward_only=True)
    return store[0]["logits"] if ps.is_pipeline_last_stage() else None


def _load_forward_export(model_dirs: dict, tokens: torch.Tensor) -> dict:
    """Per model: logits, bytes this rank read, and the exporter's output checked bit-exactly
    against the original safetensors for both targets."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model

    results = {}
    for key, path in model_dirs.items():
        arch = QwenArchitecture.from_hf_config(path)
        model = build_model(arch, initialize_weights=False)
        report = load_hf_weights(model, arch, path)
        logits = _forward_logits(model, tokens)
        original = load_file(f"{path}/model.safetensors")
        exported = {}
        for target in ("first", "all"):
            names, mismatched = [], []
            for name, tensor in iter_hf_weights(model, arch, target=target):
                names.append(name)
                if not torch.equal(tensor.cpu(), original[name]):
                    mismatched.append(name)
            exported[target] = {"names": names, "mismatched": mismatched}
        results[key] = {
            "logits": None if logits is None else logits[..., : arch.vocab_size],
            "padded_vocab": None if logits is None else logits.shape[-1],
            "bytes_read": report.bytes_read,
            "file_bytes": sum(t.numel() * t.element_size() for t in original.values()),
            "exported": exported,
            "rank": dist.get_rank(),
        }
    return results


LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)]


@pytest.mark.multiproc
@pytest.mark.parametrize("world,tp,pp", LAYOUTS, ids=[f"tp{t}_pp{p}" for _, t, p in LAYOUTS])
def test_megatron_logits_match_transformers(tiny_models, hf_logits, world, tp, pp):
    keys = list(tiny_models) if world == 1 else ["qwen2", "qwen3"]
    per_rank = run_distributed(_load_forward_export, world_size=world, tp=tp, pp=pp,
                               args=({k: tiny_models[k] for k in keys}, _tokens()), timeout=300)
    worst = {}
    for key in keys:
        last_stage = [r[key] for r in per_rank if r[key]["logits"] is not None]
        assert len(last_stage) == tp  # every TP rank of the last stage has the gathered logits
        for res in last_stage:
            diff = (res["logits"] - hf_logits[key]).abs().max().item()
            worst[key] = max(worst.get(key, 0.0), diff)
            assert diff < LOGIT_TOL, f"{key} tp={tp} pp={pp}: max |logit diff| {diff:.3g}"
        assert last_stage[0]["padded_vocab"] % tp == 0
        for res in (r[key] for r in per_rank):
            # each rank read only its slices: about 1/(tp*pp) of the file (norms are replicated)
            assert res["bytes_read"] <= res["file_bytes"] * (1.0 / (tp * pp) + 0.05), (key, res["rank"])
            all_ = res["exported"]["all"]
            assert all_["mismatched"] == [] and len(all_["names"]) == len(set(all_["names"]))
            first = res["exported"]["first"]
            if res["rank"] == 0:
                assert first["mismatched"] == [] and first["names"] == all_["names"]
            else:
                assert first["names"] == []
        n_tensors = len(per_rank[0][key]["exported"]["all"]["names"])
        layers = QwenArchitecture.from_hf_config(tiny_models[key]).num_layers
        assert n_tensors == (layers * 12 + 3 if key.startswith("qwen2") else layers * 11 + 2), key
    print(f"\nlayout tp={tp} pp={pp}: max |megatron - transformers| logits: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_rope_variants_change_the_reference(tiny_models, hf_logits):
    """The linear/YaRN checks above are meaningful: the same weights without scaling differ."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        for key, base_type in (("qwen2_linear_rope", "qwen2"), ("qwen3_yarn", "qwen3")):
            plain = AutoModelForCausalLM.from_pretrained(
                tiny_models[key], dtype=torch.float32,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
            assert (plain(_tokens()).logits - hf_logits[key]).abs().max().item() > 1e-2, key


@pytest.mark.gpu
def test_transformer_engine_spec_matches_transformers_on_gpu(tiny_models, hf_logits):
    """GPU path: Transformer Engine layer spec, same weights, same logits (fp32)."""
    results = run_distributed(_te_forward, world_size=1, args=(tiny_models["qwen3"], _tokens()), timeout=600)
    logits = results[0]
    assert (logits - hf_logits["qwen3"]).abs().max().item() < 1e-4


def _te_forward(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model, transformer_engine_available
    from megatron_sdar.utils.device import causal_attention_mask

    assert transformer_engine_available()
    arch = QwenArchitecture.from_hf_config(path)
    model = build_model(arch, use_transformer_engine=True, initialize_weights=False).cuda()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names)  # the TE fused names
    load_hf_weights(model, arch, path)
    model.eval()
    tokens = tokens.cuda()
    with torch.no_grad():
        seq = tokens.shape[1]
        out = model(tokens, torch.arange(seq, device="cuda").expand_as(tokens),
                    causal_attention_mask(seq, device="cuda"))
    return out[..., : arch.vocab_size].float().cpu()


@pytest.mark.gpu
def test_local_spec_on_gpu_matches_transformers_and_exports_exactly(tiny_models):
    """GPU path without CPU shims: CUDA params, fused bias-SwiGLU; fp32 logits and bf16 export."""
    results = run_distributed(_gpu_local_spec_check, world_size=1,
                              args=({k: tiny_models[k] for k in ("qwen2", "qwen3")}, _tokens()), timeout=600)[0]
    for key, res in results.items():
        assert res["fp32_logit_diff"] < 1e-4, (key, res)
        assert res["fp32_export_exact"] and res["bf16_export_exact"], (key, res)


def _gpu_local_spec_check(model_dirs: dict, tokens: torch.Tensor) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model
    from megatron_sdar.utils.device import causal_attention_mask, cpu_shims_active

    assert not cpu_shims_active() and torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for key, path in model_dirs.items():
        arch = QwenArchitecture.from_hf_config(path)
        original = load_file(f"{path}/model.safetensors")
        res = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = build_model(arch, use_transformer_engine=False, initialize_weights=False, params_dtype=dtype)
            assert next(model.parameters()).is_cuda
            load_hf_weights(model, arch, path)
            tag = "fp32" if dtype == torch.float32 else "bf16"
            res[f"{tag}_export_exact"] = all(
                torch.equal(t.cpu(), original[n].to(dtype)) for n, t in iter_hf_weights(model, arch))
            if dtype == torch.float32:
                model.eval()
                seq = tokens.shape[1]
                with torch.no_grad():
                    got = model(tokens.cuda(), torch.arange(seq, device="cuda").expand_as(tokens).contiguous(),
                                causal_attention_mask(seq, device="cuda"))[..., : arch.vocab_size]
                    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()(tokens.cuda()).logits
                res["fp32_logit_diff"] = (got - ref).abs().max().item()
            del model
        out[key] = res
    return out
