"""A process's random generator states, captured and restored whole (for checkpoints)."""
from __future__ import annotations

import random
import sys
from typing import Any

import torch

from megatron_sdar.utils.device import on_gpu


def capture_rng_state() -> dict[str, Any]:
    """This rank's generator states, as tensors and plain tuples (so the file loads with
    ``weights_only=True``): python ``random``, numpy's global generator when numpy is imported,
    torch CPU, torch CUDA (current device) and Megatron's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"python": random.getstate(), "torch_cpu": torch.get_rng_state()}
    if "numpy" in sys.modules:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    if on_gpu():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    state["megatron_tracker"] = {name: s for name, s in tracker.get_states().items() if isinstance(s, torch.Tensor)}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch_cpu"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and on_gpu():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if state.get("megatron_tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))
