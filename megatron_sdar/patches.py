"""Workarounds for bugs and rough edges of the libraries we build on, in one place.

Each entry names the library version it was written against and why it exists, so it can be
dropped when the library is fixed. Nothing here changes numerics. The CPU shims that let
megatron-core run without a GPU are not workarounds of bugs and live in
:mod:`megatron_sdar.utils.device`.
"""
from __future__ import annotations

import contextlib
import logging

import torch

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


@contextlib.contextmanager
def keep_torch_set_num_threads():
    """Restore ``torch.set_num_threads`` after vLLM's engine starts.

    Why (vLLM 0.32, CPU worker): starting the worker replaces ``torch.set_num_threads`` with a
    stub that only warns, which would silently ignore the trainer's own thread settings.
    """
    original = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = original


def vllm_cpu_whole_prompt_prefill(max_model_len: int) -> dict:
    """Engine arguments that prefill each prompt in one chunk (vLLM's CPU backend only).

    Why (vLLM 0.32, CPU model runner): a prompt with a per-request seed that is prefilled in chunks
    crashes the sampler ("CPU Generator does not use offset"); our rollouts seed every request.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}


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


# ------------------------------------------------------------------------------------------------
# megatron-core 0.19: optimizer state in checkpoints (used by megatron_sdar.checkpoint.training)
# ------------------------------------------------------------------------------------------------
def check_uniform_param_dtype(policy) -> None:
    """Refuse models whose parameters mix dtypes, before any collective (checkpoint save and load).

    Why (megatron-core 0.19, ``optimizer/optimizer.py``, ``optimizer/distrib_optimizer.py``): it maps
    optimizer state to parameters assuming a single parameter dtype
    (``Float16OptimizerWithFloat16Params.sharded_state_dict`` enumerates the bf16 parameters only,
    the distributed optimizer's buffers are per dtype) and fails on a mix with an assertion deep in
    its code. The mix arises with bf16 and Megatron's local layer spec, whose torch norms keep fp32
    weights (CPU, or a GPU without Transformer Engine); with Transformer Engine every parameter is
    bf16, and fp32 training is uniform.
    """
    dtypes = sorted({str(p.dtype).replace("torch.", "") for chunk in policy.model for p in chunk.parameters()})
    if len(dtypes) > 1:
        raise NotImplementedError(
            f"the model's parameters mix dtypes ({', '.join(dtypes)}; bf16 with the local layer spec keeps "
            "fp32 norm weights): megatron-core 0.19 cannot checkpoint the optimizer state of such a "
            "model. Train in float32 without Transformer Engine, or with Transformer Engine in bf16")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def materialize_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh torch-Adam ``DistributedOptimizer`` zero moments and a step counter.

    Why (megatron-core 0.19, ``optimizer/distrib_optimizer.py``): without Apex/Transformer Engine (the CPU environment) ``DistributedOptimizer.state_dict``
    reads the per-parameter ``step`` of the inner torch optimizer, which has no state before its
    first step, so the state dict to load into cannot be built. The load overwrites the zeros.
    With Apex/TE the step lives in the param groups and nothing is needed.
    """
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for opt in _sub_optimizers(optimizer):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or opt.init_state_fn is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                opt.optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)``, with the distributed optimizer's parameter state
    (moments and fp32 master slices) loaded by us.

    Why (megatron-core 0.19, ``DistributedOptimizer.load_state_dict``): with torch's Adam (no Apex/TE) ``DistributedOptimizer.load_state_dict``
    fails on both formats: it copies every tensor of the inner optimizer's per-parameter state, which
    includes torch Adam's ``step`` that the checkpointed slices do not have (KeyError), and the
    ``dp_reshardable`` loader copies into fp32 master views of the parameters with autograd on. We
    load the groups and step through Megatron, then call its format's loader under ``no_grad`` with
    ``step`` set aside (it was already restored from the param groups). Megatron also hands every
    parameter the *same* ``step`` tensor, which torch's Adam increments in place once per parameter
    (wrong bias correction after resume): each parameter gets its own copy back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _sub_optimizers(optimizer)
    sub_states = [state] if len(subs) == 1 else [state[key] for key in sorted(state)]
    pending = []
    for sub, sub_state in zip(subs, sub_states):
        if isinstance(sub, DistributedOptimizer) and "param_state" in sub_state:
            pending.append((sub, sub_state.pop("param_state"), sub_state.pop("param_state_sharding_type")))
    optimizer.load_state_dict(state)
    for sub, param_state, sharding in pending:
        loader = {"dp_reshardable": sub.load_parameter_state_from_dp_reshardable,
                  "fully_reshardable": sub.load_parameter_state_from_fully_reshardable}[sharding]
        inner = sub.optimizer.state
        steps = {param: s.pop("step") for param, s in inner.items() if "step" in s}
        try:
            with torch.no_grad():
                loader(param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step.clone()
