"""Run a function in N gloo processes with a Megatron parallel layout, for CPU tests.

    results = run_distributed(my_check, world_size=4, tp=2, pp=2, args=(seed,))

``my_check`` must be a module-level (picklable) function. Each worker process:

* sets ``OMP_NUM_THREADS=1`` (two cores are shared by all ranks),
* initializes a gloo process group and Megatron's parallel state with the given
  TP/PP/CP layout (DP is what remains of the world size); ``init="process_group"`` stops after
  the process group, ``init="none"`` initializes nothing (e.g. for a vLLM engine that sets up
  its own),
* activates the CPU shims of :mod:`megatron_sdar.utils.device` (no GPU is present),
* calls ``my_check(*args, **kwargs)`` and sends its (picklable) return value back.

The parent returns the per-rank results in rank order. A rank that raises makes the call raise
:class:`DistributedTestError` with that rank's traceback; ranks still running after ``timeout``
seconds (a hung collective) are killed and the call raises with the list of stuck ranks, so a
deadlock fails the test instead of hanging CI.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

from megatron_sdar.utils.parallel_dims import ParallelDims


class DistributedTestError(RuntimeError):
    """A worker rank failed or hung."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, layout, port, fn, args, kwargs, result_queue, init, env):
    os.environ.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(layout.world),
    )
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_sdar.utils import distributed as dist_utils

        if init != "none":
            dist_utils.init_process_group(timeout_s=120)  # gloo on CPU, NCCL on GPU
        if init == "megatron":
            layout.initialize(seed=1234)
        result = fn(*args, **kwargs)
        # Pickle here, by value: a failure inside the queue's feeder thread would never reach the
        # parent, and multiprocessing's pickler sends tensors as shared-memory handles that the parent
        # can only open while this process lives (a busy machine lost results that way).
        result_queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        result_queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_sdar.utils import distributed as dist_utils

            dist_utils.destroy()
        except Exception:
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    recompute: str = "none",
    distributed_optimizer: bool = False,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    init: str = "megatron",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return results in rank order.

    ``env`` adds environment variables in the workers (e.g. ``MEGATRON_SDAR_FORCE_CPU=1``). The
    layout's flags (``sequence_parallel``, ``recompute``, ``distributed_optimizer``) reach the
    workers through :meth:`ParallelDims.current`, as the main job's do.
    """
    layout = ParallelDims.for_world(world_size, tp=tp, pp=pp, cp=cp, ep=ep, vpp=vpp,
                                    sequence_parallel=sequence_parallel, recompute=recompute,
                                    distributed_optimizer=distributed_optimizer)
    if init not in ("megatron", "process_group", "none"):
        raise ValueError(f"init must be 'megatron', 'process_group' or 'none', got {init!r}")
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, layout, port, fn, tuple(args), kwargs or {}, result_queue, init, env or {}),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stuck = sorted(set(range(world_size)) - set(results))
                raise DistributedTestError(
                    f"{fn.__name__}: ranks {stuck} did not finish within {timeout:.0f}s "
                    f"(layout {layout}); a collective probably hung"
                )
            try:
                rank, status, payload = result_queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in results and p.exitcode is not None and p.exitcode != 0
                ]
                if dead:
                    # A rank died without reporting (segfault, os._exit, OOM kill).
                    time.sleep(0.5)
                    if result_queue.empty():
                        raise DistributedTestError(
                            f"{fn.__name__}: rank {dead[0]} exited with code "
                            f"{procs[dead[0]].exitcode} without a result (layout {layout})"
                        )
                continue
            if status == "error":
                raise DistributedTestError(
                    f"{fn.__name__} failed on rank {rank} of {world_size} (layout {layout}):\n{payload}"
                )
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        result_queue.close()
    return [results[r] for r in range(world_size)]
