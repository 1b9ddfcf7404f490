"""Stand-ins for the recipes' HF checkpoints, which tests cannot download: a model directory holding
only the ``config.json`` that the recipe's ``model.architecture`` numbers describe."""
from __future__ import annotations

import json
from pathlib import Path


def recipe_names() -> list[str]:
    import megatron_sdar.config as config_pkg

    return sorted(p.stem for p in (Path(config_pkg.__file__).parent / "experiment").glob("*.yaml"))


def recipe_model_config(recipe: str) -> dict:
    """The HF ``config.json`` of a recipe's model, from ``model.arch`` and ``model.architecture``."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("megatron_sdar.config", version_base=None):
        model = compose("sdar", overrides=[f"experiment={recipe}"]).model
    a = model.architecture
    cfg = {"model_type": model.arch, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
           "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
           "intermediate_size": a.ffn, "vocab_size": a.vocab, "tie_word_embeddings": a.tied_embeddings,
           "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "torch_dtype": "bfloat16"}
    if model.arch == "qwen3":
        cfg["attention_bias"] = bool(a.qkv_bias)
    if model.arch == "qwen3_moe":
        cfg.update(num_experts=a.num_experts, num_experts_per_tok=a.experts_per_token,
                   moe_intermediate_size=a.moe_ffn_hidden, norm_topk_prob=True, decoder_sparse_step=1)
    return cfg


def recipe_model_dir(recipe: str, root: Path) -> Path:
    """``root/<recipe>/config.json`` for the recipe's model (created once)."""
    path = Path(root) / recipe
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(recipe_model_config(recipe), indent=2))
    return path
