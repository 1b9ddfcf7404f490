"""Process-group and Megatron parallel-state setup shared by the trainer, tools and tests."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_sdar.utils.device import cpu_shims_active, setup_device


def init_process_group(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Initialize ``torch.distributed`` from the torchrun-style environment and pick the device.

    ``backend`` defaults to NCCL on GPU and gloo on CPU. Without ``WORLD_SIZE`` in the
    environment a single-process group is created (plain ``python`` runs).
    """
    device = setup_device()
    if dist.is_initialized():
        return device
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if backend is None:
        backend = "gloo" if device.type == "cpu" else "nccl"
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    return device


def initialize_megatron_parallel(
    tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, vpp: int | None = None, seed: int = 1234
) -> None:
    """Megatron parallel state plus the model-parallel RNG seeds.

    On CPU the RNG tracker is Megatron's inference tracker (no CUDA RNG states to fork); dropout
    inside TP regions then uses the default generator.
    """
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=cpu_shims_active(), force_reset_rng=True
    )


def destroy() -> None:
    """Tear down Megatron parallel state and the process group (safe to call twice)."""
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def cp_token_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a sequence that CP rank ``cp_rank`` holds under Megatron's load-balanced split.

    The sequence is cut into ``2 * cp_size`` equal chunks and rank ``r`` takes chunks ``r`` and
    ``2 * cp_size - 1 - r``, so causal attention work is even across ranks. ``seq_len`` must be a
    multiple of ``2 * cp_size``.
    """
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 * cp_size = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])
