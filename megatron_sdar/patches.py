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


_SHM_PREFIX_VARIABLE = "MEGATRON_SDAR_VLLM_SHM_PREFIX"


def unique_vllm_cpu_shm_name() -> None:
    """Give this engine's CPU shared-memory communicator a name no other engine on the machine uses.

    Why (vLLM 0.32 CPU backend, ``device_communicators/cpu_communicator.py`` and
    ``v1/worker/cpu_worker.py``): the tensor-parallel all-reduce of rollout TP >= 2 goes through
    ``/dev/shm`` segments named from ``$VLLM_DIST_IDENT``, which the CPU worker derives from the
    init method: ``//`` (from ``env://``) under ``external_launcher``, the same for every job. Two engines on one
    machine (two jobs, or a job after a killed one whose segments remain) then collide: the second
    fails with "create shm in SHMManager failed. errno: 17". The segment names get a prefix that
    rank 0 draws and every rank shares (a TP group must agree on it). Collective: every rank calls it.
    """
    import os
    import time

    import torch.distributed as dist
    from vllm.distributed.device_communicators import cpu_communicator

    prefix = [f"s{(os.getpid() * 1_000_003 + time.time_ns()) % 16**6:06x}" if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(prefix, src=0)
    os.environ[_SHM_PREFIX_VARIABLE] = prefix[0]
    shm = cpu_communicator._CPUSHMDistributed
    original = shm.make_group_name
    if getattr(original, "_sdar_prefixed", False):
        return

    def make_group_name(communicator) -> str:
        # the original starts with the identifier "//" (from "env://"): no slash may follow the prefix
        return os.environ.get(_SHM_PREFIX_VARIABLE, "") + original(communicator).replace("/", "")

    make_group_name._sdar_prefixed = True  # type: ignore[attr-defined]
    shm.make_group_name = staticmethod(make_group_name)


def shield_llvmlite_from_vllm_kernel_scan() -> None:
    """Stop llvmlite's library wrapper from answering ``__dict__`` before vLLM scans every module.

    Why (vLLM 0.32 ``triton_utils/dispatcher.py`` ``_rebind_kernels``, run by the CPU worker's
    ``register_triton_kernel_overrides`` at engine start; llvmlite 0.47 ``binding/ffi.py``): vLLM looks
    at every value of every imported module and reads ``vars(value).get("kernel")`` of any that has a
    ``__dict__``. llvmlite's ``ffi.lib`` (a ``_lib_wrapper`` with ``__slots__``) answers any missing
    attribute, ``__dict__`` included, with a wrapped C function, so the engine fails to start with
    "AttributeError: '_lib_fn_wrapper' object has no attribute 'get'" whenever numba was imported
    first (``bm25s`` imports it: the search and WebShop environments). Dunder names now raise
    AttributeError, as ``ctypes.CDLL`` does; llvmlite never looks one up through this wrapper.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    if ffi is None:  # not imported yet: the scan cannot meet it
        return
    original = ffi._lib_wrapper.__getattr__
    if getattr(original, "_sdar_no_dunder", False):
        return

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return original(self, name)

    __getattr__._sdar_no_dunder = True  # type: ignore[attr-defined]
    ffi._lib_wrapper.__getattr__ = __getattr__


def _repack_cpu_weights(worker) -> int:
    """On one vLLM worker: redo the CPU weight preparation that an in-place reload skips (the LM head
    that shares the embedding's weight, the MoE experts' prepacked layout); returns how many layers."""
    model = worker.model_runner.get_model()
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    repacked = 0
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and hasattr(module, "cpu_linear") and owners[id(weight)] > 1:
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
        elif "w13_weight" in getattr(module, "_parameters", {}):
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if experts is not None:  # the CPU experts prepack w13 / w2 into their kernel's layout
                experts.process_weights_after_loading(module)
                repacked += 1
    return repacked


def repack_cpu_weights_after_reload(llm) -> None:
    """Redo the CPU backend's weight preparation after an in-place weight reload.

    Why (vLLM 0.32 CPU backend): at load, the CPU backend converts some weights into kernel
    layouts that ``reload_weights`` (``model_loader/reload/layerwise.py``) does not redo:

    - the LM head computes logits from a packed copy of its weight
      (``UnquantizedEmbeddingMethod`` -> ``dispatch_cpu_unquantized_gemm``). With tied embeddings
      (Qwen2.5-3B, Qwen3-1.7B) the head shares ``embed_tokens.weight`` and receives no tensor of its
      own, so the embedding is updated and the packed head is not: vLLM kept sampling from the first
      weights' head (0.2-0.4 nats from Megatron's after a 5% perturbation);
    - the MoE experts' ``w13`` / ``w2`` are prepacked into the grouped-GEMM layout
      (``experts/cpu_moe.py``, ``cpu_prepack_moe_weight``) only when the kernel is first built; a
      reload copies the checkpoint layout into the prepacked tensors, scrambling every expert
      (Qwen3-MoE log-probs 0.2-1.9 nats off vLLM's own from disk).

    Both were found by the recipes' rehearsal (``--rehearse``). The GPU path reads the weights
    themselves and needs neither.
    """
    llm.collective_rpc(_repack_cpu_weights)


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


def start_checkpoint_write_queue() -> None:
    """Start megatron's checkpoint-writer results queue now, with SIGINT ignored while its process starts.

    Why (megatron-core 0.19, ``dist_checkpointing/strategies/filesystem_async.py``,
    ``get_write_results_queue``): the first save spawns a ``multiprocessing`` manager process. A
    terminal's Ctrl-C reaches the whole process group; one that lands while that process is starting
    (before it ignores SIGINT itself) kills it, and the save the trainer makes on Ctrl-C fails with
    ``EOFError``. Started here, before the trainer's SIGINT handler is installed, the process inherits
    the ignored disposition across its start. Idempotent; nothing changes what is written.
    """
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect against
        filesystem_async.get_write_results_queue()
        return
    try:
        filesystem_async.get_write_results_queue()
    finally:
        signal.signal(signal.SIGINT, previous)


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


class OptimizerLayoutError(ValueError):
    """A checkpoint's optimizer state cannot be loaded at this layout (one line says why)."""


def _take_current_hyperparameters(sub, sub_state) -> None:
    """Give the checkpoint's parameter groups this run's hyperparameters (lr, min/max lr, betas, eps,
    weight decay...), keeping what the groups hold of the state itself (``params``, ``step``).

    Why (megatron-core 0.19, ``MegatronOptimizer._filter_and_reorder_param_groups``): it pairs the
    saved groups with the current ones by a key that includes ``max_lr`` and ``min_lr`` (the
    ``OptimizerConfig``'s lr), so any change of the learning rate on resume fails with "Could not find
    parameter group with key ...", and torch's ``load_state_dict`` would otherwise restore the saved
    betas and eps over the new ones. Megatron pairs the groups by position (the params it keeps come
    from the saved order), so the saved group ``i`` takes the current group ``i``'s settings: what was
    changed on resume applies from the resumed step, and the Adam moments are kept.
    """
    current = getattr(getattr(sub, "optimizer", None), "param_groups", None)
    # the groups sit at "param_groups" (the regular optimizer) or under "optimizer" (the distributed one)
    node = sub_state if "param_groups" in sub_state else sub_state.get("optimizer", {})
    saved = node.get("param_groups") if isinstance(node, dict) else None
    if current is None or not isinstance(saved, list) or len(saved) != len(current):
        return  # another structure: megatron's own matching reports it
    for old, new in zip(saved, current):
        old.update({k: v for k, v in new.items() if k not in ("params", "step")})


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
    saved_groups = sum(isinstance(key, int) for key in state) or 1
    if saved_groups != len(subs):
        # megatron-core 0.19 keeps expert parameters in an optimizer of their own only with expert
        # parallelism (ep > 1): a checkpoint of one kind cannot be loaded into the other
        raise OptimizerLayoutError(
            f"the checkpoint's optimizer state has {saved_groups} optimizer(s) and this layout builds {len(subs)}: "
            "megatron-core 0.19 keeps an MoE model's expert parameters in an optimizer of their own only when "
            "parallel.ep > 1, and cannot move optimizer state between ep=1 and ep>1; resume with expert "
            "parallelism on (or off) as the checkpoint was saved")
    sub_states = [state] if len(subs) == 1 else [state[key] for key in sorted(state)]
    pending = []
    for sub, sub_state in zip(subs, sub_states):
        _take_current_hyperparameters(sub, sub_state)
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
