"""Batched stepping over independent environments with a per-step timeout.

A rollout steps G x tasks episodes together. One environment that raises, hangs on an
external server or blows up on a malformed action must not take the batch down:
:class:`EnvBatch` runs each ``reset``/``step`` in a worker thread, waits at most
``step_timeout_s`` for it and turns an exception or a timeout into a failed, finished
episode (``terminated=True``, ``reward=0``, ``info["won"]=False``, ``error`` set). The
other episodes continue.

A timed-out call cannot be interrupted (Python threads cannot be killed): its worker
thread finishes in the background and its result is discarded; that environment is
marked broken and is skipped until its next successful ``reset``.
"""
from __future__ import annotations

import concurrent.futures as futures
from typing import Any, Sequence

from megatron_sdar.envs.base import StepResult, TextEnv


class EnvBatch:
    """Steps ``envs`` in parallel threads; ``None`` actions leave an episode untouched."""

    def __init__(self, envs: Sequence[TextEnv], step_timeout_s: float = 60.0, max_workers: int | None = None) -> None:
        if not envs:
            raise ValueError("EnvBatch needs at least one environment")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.envs = list(envs)
        self.step_timeout_s = float(step_timeout_s)
        # Environment steps are I/O (HTTP) or short pure-Python work: threads are enough.
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers or min(32, len(self.envs)),
                                                thread_name_prefix="env-step")
        self.finished = [True] * len(self.envs)
        self.last_info: list[dict[str, Any]] = [{} for _ in self.envs]

    def __len__(self) -> int:
        return len(self.envs)

    def _failure(self, index: int, message: str) -> StepResult:
        info = dict(self.last_info[index])
        info.update(won=False, invalid_action=False, env_error=message)
        self.finished[index] = True
        return StepResult(observation=f"Environment error: {message}", reward=0.0, terminated=True,
                          truncated=False, info=info, error=message)

    def _gather(self, jobs: dict[int, futures.Future], kind: str) -> dict[int, tuple[Any, str | None]]:
        done, _ = futures.wait(list(jobs.values()), timeout=self.step_timeout_s)
        results: dict[int, tuple[Any, str | None]] = {}
        for index, job in jobs.items():
            if job not in done:
                job.cancel()
                results[index] = (None, f"{kind} timed out after {self.step_timeout_s:g}s")
                continue
            exc = job.exception()
            if exc is not None:
                results[index] = (None, f"{kind} raised {type(exc).__name__}: {exc}")
            else:
                results[index] = (job.result(), None)
        return results

    def reset(self, seeds: Sequence[int | None] | None = None,
              splits: Sequence[str] | None = None) -> list[StepResult]:
        """Reset every environment (``seeds[i]`` for env ``i``, a task of ``splits[i]``; default
        ``train``). A failed reset returns a finished StepResult with ``error`` set, so the caller
        can drop that episode."""
        if seeds is not None and len(seeds) != len(self.envs):
            raise ValueError(f"got {len(seeds)} seeds for {len(self.envs)} environments")
        if splits is not None and len(splits) != len(self.envs):
            raise ValueError(f"got {len(splits)} splits for {len(self.envs)} environments")
        seeds = list(seeds) if seeds is not None else [None] * len(self.envs)
        splits = list(splits) if splits is not None else ["train"] * len(self.envs)
        jobs = {i: self._pool.submit(env.reset, seed=seeds[i], split=splits[i]) for i, env in enumerate(self.envs)}
        out: list[StepResult] = []
        for i, (value, error) in sorted(self._gather(jobs, "reset").items()):
            if error is not None:
                out.append(self._failure(i, error))
                continue
            observation, info = value
            self.finished[i] = False
            self.last_info[i] = info
            out.append(StepResult(observation, 0.0, False, False, info))
        return out

    def step(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step env ``i`` with ``actions[i]``. Finished episodes and ``None`` actions give
        ``None``; a finished episode with a non-None action is an error of the caller."""
        if len(actions) != len(self.envs):
            raise ValueError(f"got {len(actions)} actions for {len(self.envs)} environments")
        for i, action in enumerate(actions):
            if action is not None and self.finished[i]:
                raise ValueError(f"environment {i} has finished its episode; pass None as its action")
        jobs = {i: self._pool.submit(self.envs[i].step, action) for i, action in enumerate(actions) if action is not None}
        results: list[StepResult | None] = [None] * len(self.envs)
        for i, (value, error) in self._gather(jobs, "step").items():
            if error is not None:
                results[i] = self._failure(i, error)
                continue
            observation, reward, terminated, truncated, info = value
            self.last_info[i] = info
            self.finished[i] = terminated or truncated
            results[i] = StepResult(observation, reward, terminated, truncated, info)
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for env in self.envs:
            try:
                env.close()
            except Exception:  # closing is best effort; one broken env must not hide the others
                pass
