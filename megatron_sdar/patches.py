"""Workarounds for bugs and rough edges of the libraries we build on, in one place.

Each entry names the library version it was written against and why it exists, so it can be
dropped when the library is fixed. Nothing here changes numerics.
"""
from __future__ import annotations

import logging

# ------------------------------------------------------------------------------------------------
# vLLM 0.32
# ------------------------------------------------------------------------------------------------
_LAYERWISE_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _DerivedRotaryCacheFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning of every in-place reload.

    Why (vLLM 0.32, ``model_loader/reload/layerwise.py``, ``finalize_layerwise_processing``): the
    rotary layers hold a ``cos_sin_cache`` tensor that vLLM computes from the config; no HF
    checkpoint carries it, so a weight stream (ours, or a checkpoint on disk) never loads it, and vLLM
    warns for every layer with tensors that received nothing before putting the existing tensors
    back. For the rotary cache that fallback is exactly right: it depends on the config, not on the
    weights. The warning for any other layer (a real missing weight) still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args:
            return "RotaryEmbedding" not in str(record.args[0])
        return True


def quiet_vllm_reload_warnings() -> None:
    """Install :class:`_DerivedRotaryCacheFilter` (idempotent)."""
    logger = logging.getLogger(_LAYERWISE_RELOAD_LOGGER)
    if not any(isinstance(f, _DerivedRotaryCacheFilter) for f in logger.filters):
        logger.addFilter(_DerivedRotaryCacheFilter())
