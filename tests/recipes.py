"""Stand-ins for the recipes' HF checkpoints, which tests cannot download: a model directory holding
only the ``config.json`` that the recipe's ``model.architecture`` numbers describe."""
from __future__ import annotations

import json
from pathlib import Path


def recipe_names() -> list[str]:
    from megatron_sdar.config.schema import recipe_names as names

    return names()


def recipe_model_config(recipe: str) -> dict:
    """The HF ``config.json`` of a recipe's model: its ``model.architecture`` block (config.json's own
    keys), ``model_type`` from ``model.arch``, and the values a Qwen config states besides the shape."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("megatron_sdar.config", version_base=None):
        model = compose("sdar", overrides=[f"experiment={recipe}"]).model
    return {"max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "torch_dtype": "bfloat16", **OmegaConf.to_container(model.architecture), "model_type": model.arch}


def recipe_model_dir(recipe: str, root: Path) -> Path:
    """``root/<recipe>/config.json`` for the recipe's model (created once)."""
    path = Path(root) / recipe
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(recipe_model_config(recipe), indent=2))
    return path
