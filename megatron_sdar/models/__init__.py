"""Qwen models on Megatron-Core and two-way Hugging Face checkpoint conversion.

* :mod:`.architecture`: ``QwenArchitecture.from_hf_config`` (the validated HF config).
* :mod:`.megatron_model`: ``build_transformer_config`` / ``build_model`` (GPTModel, TE or local spec).
* :mod:`.weight_mapping`: HF <-> Megatron parameter rules (fused QKV with GQA, gate/up, vocab padding).
* :mod:`.hf_loader`: ``load_hf_weights`` (each rank reads only its safetensors slices).
* :mod:`.exporter`: ``iter_hf_weights`` (full HF tensors from a TP/PP-sharded model, one at a time).
* :mod:`.hf_writer`: streaming safetensors writer for HF export.
* :mod:`.tiny`: tiny random Qwen models for tests and the CPU default run.

Checkpoints (model-only and training) live in :mod:`megatron_sdar.checkpoint`.

Submodules are imported on use: importing this package pulls in neither torch nor megatron.
"""
from megatron_sdar.models.architecture import (  # noqa: F401
    QwenArchitecture,
    RopeSpec,
    UnsupportedConfigError,
)
