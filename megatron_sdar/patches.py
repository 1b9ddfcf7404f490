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


# ------------------------------------------------------------------------------------------------
# megatron-core 0.19
# ------------------------------------------------------------------------------------------------
def allow_sequence_parallel_torch_norm() -> None:
    """Let the local spec's norms (``WrappedTorchNorm``) run with sequence parallelism (idempotent).

    Why (megatron-core 0.19, ``transformer/torch_norm.py``): ``WrappedTorchNorm`` asserts
    ``not config.sequence_parallel``, so the local (non-Transformer-Engine) spec cannot be built
    with SP at all. A norm is per token, so on sequence-sharded activations it is exact; the only
    thing SP needs is that the replicated norm weights' gradients (each TP rank saw other tokens)
    are summed over TP, which ``finalize_model_grads`` does for parameters flagged
    ``sequence_parallel`` (Transformer Engine's norms carry the same flag). This builds the norm
    as without SP and flags its parameters.
    """
    import dataclasses

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__
    if getattr(original, "_sdar_sequence_parallel", False):
        return

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):  # noqa: N807 - the patched constructor
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, **kwargs)
        norm = original(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__._sdar_sequence_parallel = True
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)
