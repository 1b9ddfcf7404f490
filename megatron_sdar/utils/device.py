"""The device layer: GPU when there is one, otherwise the CPU shims that let megatron-core run.

This module is the **only** place that bends megatron-core to run on CPU. Nothing in it is active
on a machine with a GPU (unless forced with ``MEGATRON_SDAR_FORCE_CPU=1``, for tests).

Megatron-Core assumes CUDA in a handful of ways; on CPU we:

1. make ``torch.cuda.current_device()`` return ``"cpu"`` (parameters and buffers are created with
   ``device=torch.cuda.current_device()``), and turn the stream / event / synchronize calls into
   no-ops;
2. push a :class:`torch.overrides.TorchFunctionMode` that rewrites ``device="cuda"`` in factory
   calls and ``.to("cuda")`` to the CPU, drops ``pin_memory=True``, makes ``.cuda()`` a no-op,
   and makes a bare ``Tensor.type()`` report ``torch.cuda.*`` names (``DistributedOptimizer``
   checks parameter types by name);
3. create the RNG tracker with ``inference_rng_tracker=True`` (the training tracker forks CUDA
   RNG states), see :func:`megatron_sdar.utils.distributed.initialize_megatron_parallel`;
4. require explicit causal masks (the fused causal softmax is CUDA-only): see
   :func:`causal_attention_mask`;
5. let activation recomputation save and restore "the CUDA RNG state" as the CPU generator's
   (megatron-core's ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
   call the CUDA driver): on CPU every random op draws from that one generator;
6. build the TransformerConfig without CUDA-only fusions, batched p2p or the alltoall MoE
   dispatcher (:func:`transformer_config_device_fields`), keep models where they were built
   (:func:`move_to_gpu`), and give vLLM's CPU backend its environment (:func:`vllm_device_environment`).

:func:`on_gpu` is the one test for "a real GPU is in use" (CUDA present, shims off).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_FORCE_CPU_ENV = "MEGATRON_SDAR_FORCE_CPU"
_SHIMS_ACTIVE = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device index means a CUDA ordinal in torch's factory calls.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Routes CUDA placements to the CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):  # pinning needs a CUDA driver (e.g. Megatron's CP RoPE slicing)
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` on CPU: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


def cpu_shims_requested() -> bool:
    """True when there is no GPU, or ``MEGATRON_SDAR_FORCE_CPU=1`` asks for CPU."""
    if os.environ.get(_FORCE_CPU_ENV, "0") not in ("", "0"):
        return True
    return not torch.cuda.is_available()


def cpu_shims_active() -> bool:
    return _SHIMS_ACTIVE


def on_gpu() -> bool:
    """A real GPU is in use: CUDA is present and the CPU shims are off (the one such test)."""
    return torch.cuda.is_available() and not _SHIMS_ACTIVE


def fused_softmax_kernels_available() -> bool:
    """Megatron's fused masked-softmax CUDA kernels (built with Megatron-LM, absent from the wheel)."""
    try:
        import scaled_masked_softmax_cuda  # noqa: F401
        import scaled_upper_triang_masked_softmax_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config_device_fields(on_cpu: bool, *, moe: bool = False,
                                     te_available: bool = False) -> dict:
    """The ``TransformerConfig`` fields that differ between the CPU shims and a GPU.

    CPU: weights initialised on the CPU; no fused bias-activation / masked-softmax kernels (CUDA
    only; the softmax one also needs Megatron-LM's build); single p2p calls instead of batched
    isend/irecv (on gloo the interleaved schedule's batched p2p delivers wrong activations in
    training, forward-only passes are unaffected); for MoE the ``allgather`` token dispatcher
    (megatron-core's ``alltoall`` one copies its split sizes to the host on a side stream and waits
    on the recorded CUDA event, which the null stream returns as None: every EP rank then sees all
    tokens and keeps its experts', more traffic, same result) and no grouped GEMM (Transformer
    Engine's, GPU only).
    """
    fields = dict(use_cpu_initialization=on_cpu, bias_activation_fusion=not on_cpu,
                  masked_softmax_fusion=not on_cpu and fused_softmax_kernels_available(),
                  batch_p2p_comm=not on_cpu)
    if moe:
        fields.update(moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
                      moe_grouped_gemm=not on_cpu and te_available)
    return fields


def vllm_device_environment(cpu_kv_cache_gib: float) -> None:
    """Environment for an in-process vLLM engine on this device (call before it starts). On CPU:
    the KV-cache size, and no OpenMP thread pinning (vLLM pins to cores by default; the trainer
    shares those cores). Nothing on a GPU."""
    if on_gpu():
        return
    # The config is the one source of the size (a VLLM_CPU_KVCACHE_SPACE left in the environment
    # by an earlier engine must not win); vLLM reads whole GiB (validate() refuses fractions).
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def move_to_gpu(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` on this process's GPU when one is in use (Megatron creates its linears on the GPU
    but the local spec's torch norms on the CPU), else unchanged."""
    if on_gpu():
        module.cuda(torch.cuda.current_device())
    return module


def enable_cpu_shims() -> None:
    """Activate the CPU shims (idempotent). Only call where :func:`cpu_shims_requested`."""
    global _SHIMS_ACTIVE, _MODE
    if _SHIMS_ACTIVE:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # pushed for the life of the process
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _SHIMS_ACTIVE = True


def setup_device(local_rank: int | None = None) -> torch.device:
    """Pick this process's device: the local GPU, or the CPU with the shims enabled."""
    if cpu_shims_requested():
        enable_cpu_shims()
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def current_device() -> torch.device:
    """The device tensors should be created on (CPU when the shims are active)."""
    if _SHIMS_ACTIVE or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Megatron-style causal mask ``[1, 1, seq_len, seq_len]``; ``True`` marks masked positions.

    Passed explicitly to ``GPTModel.forward(attention_mask=...)``: Megatron's local attention
    builds no causal mask itself when the fused CUDA softmax is unavailable.
    """
    device = device if device is not None else current_device()
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[
        None, None
    ]
