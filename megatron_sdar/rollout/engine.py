"""The vLLM rollout engine, colocated with the trainer ranks.

vLLM runs inside the training processes through its ``external_launcher`` executor (made for
torchrun-style SPMD jobs): every trainer rank is also a vLLM worker. The rollout tensor-parallel
size is independent of the training layout: with ``W`` ranks and rollout TP ``t``, vLLM runs
``W / t`` data-parallel engine replicas; rank ``r`` belongs to rollout replica ``r // t``, and
the ``t`` ranks of a replica feed it the same prompts (each gets the same outputs).

Lockstep: vLLM's data-parallel replicas synchronize every engine step, so every rank calls
:meth:`RolloutEngine.generate` the same number of times (with an empty list when it has nothing
to generate) -- the agent loop guarantees this.

Memory: on GPU the engine is created with sleep mode; :meth:`sleep` frees its weights and KV cache
while the trainer runs, :meth:`wake_up` takes them back (weights first, then the resync, then
the KV cache). vLLM's CPU backend has no sleep mode; both calls are no-ops there.

Weight sync: :meth:`sync_weights` streams the trainer's weights (a
:class:`~megatron_sdar.rollout.weight_sync.MegatronWeightSource`) into the workers' in-place
``reload_weights`` and then drops the prefix cache (its KV blocks were computed with the old
weights).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_sdar.rollout.weight_sync import MegatronWeightSource, SyncStats


class RolloutEngineError(RuntimeError):
    """vLLM could not be started or failed during generation / weight sync."""


@dataclass
class RolloutEngineConfig:
    """Engine knobs (the ``rollout`` config group feeds these).

    ``tp``: rollout tensor-parallel size (divides the world size). ``max_model_len``: prompt +
    response budget. ``gpu_memory_utilization``: vLLM's share of GPU memory (colocated with the
    trainer, so well below 1). ``cpu_kv_cache_gib``: KV-cache size on CPU. ``dtype``: "auto"
    follows the checkpoint's ``torch_dtype`` (the trainer passes its parameter dtype). ``quantization``: e.g. "fp8" for FP8 rollouts (GPU).
    """

    tp: int = 1
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = True
    enable_sleep_mode: bool = True
    quantization: str | None = None
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"rollout tp must be >= 1, got {self.tp}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {self.max_model_len}")


@dataclass
class Generation:
    """One completion: the prompt ids vLLM saw, the sampled ids and their log-probs."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None


def _resolve_dtype(model_dir: str | Path, dtype: str) -> str:
    """"auto" = the checkpoint's dtype (vLLM's own "auto" turns float32 into bfloat16 on CPU,
    which would break the train/inference log-prob agreement of an fp32 run)."""
    if dtype != "auto":
        return dtype
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "auto").replace("torch.", "")


def engine_args(model_dir: str | Path, config: RolloutEngineConfig, dp_size: int, on_gpu: bool) -> dict:
    """The ``vllm.LLM(...)`` arguments of the engine (what the dry run prints): ``dp_size`` rollout
    replicas of ``config.tp`` ranks each, inside the trainer's processes (``external_launcher``)."""
    kwargs = dict(
        model=str(model_dir), tokenizer=str(model_dir), dtype=_resolve_dtype(model_dir, config.dtype),
        max_model_len=config.max_model_len, enforce_eager=config.enforce_eager, seed=config.seed,
        distributed_executor_backend="external_launcher", tensor_parallel_size=config.tp,
        data_parallel_size=dp_size, max_num_seqs=config.max_num_seqs, quantization=config.quantization,
    )
    if on_gpu:
        kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization, enable_sleep_mode=config.enable_sleep_mode)
    else:
        from megatron_sdar.patches import vllm_cpu_whole_prompt_prefill

        kwargs.update(vllm_cpu_whole_prompt_prefill(config.max_model_len))
    return kwargs


class RolloutEngine:
    """A colocated vLLM engine over the HF checkpoint in ``model_dir`` (its config and
    tokenizer; the weights are replaced by :meth:`sync_weights` before the first rollout).

    Requires ``torch.distributed`` to be initialized (the trainer does it; a single process is a
    world of one).
    """

    def __init__(self, model_dir: str | Path, config: RolloutEngineConfig | None = None) -> None:
        import torch.distributed as dist

        from megatron_sdar.patches import (keep_torch_set_num_threads, quiet_vllm_reload_warnings,
                                           shield_llvmlite_from_vllm_kernel_scan)
        from megatron_sdar.utils.device import on_gpu, vllm_device_environment

        quiet_vllm_reload_warnings()
        shield_llvmlite_from_vllm_kernel_scan()
        self.config = config = config or RolloutEngineConfig()
        if not dist.is_initialized():
            raise RolloutEngineError("RolloutEngine needs torch.distributed initialized "
                                     "(megatron_sdar.utils.distributed.init_process_group)")
        world = dist.get_world_size()
        if world % config.tp:
            raise ValueError(f"rollout tp={config.tp} does not divide the world size {world}")
        self.world_size, self.rank = world, dist.get_rank()
        self.dp_size = world // config.tp
        self.dp_rank = self.rank // config.tp
        self.on_gpu = on_gpu()
        # in-process engine (its model must be reachable for in-place weight updates)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm_device_environment(config.cpu_kv_cache_gib)
        if not self.on_gpu:
            from megatron_sdar.patches import unique_vllm_cpu_shm_name

            unique_vllm_cpu_shm_name()
        # torchrun sets these; a plain single process may not have them
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("LOCAL_RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        try:
            from vllm import LLM

            kwargs = engine_args(model_dir, config, self.dp_size, self.on_gpu)
            with keep_torch_set_num_threads():
                self.llm = LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised with what was being attempted
            raise RolloutEngineError(f"could not start vLLM on {model_dir} (rollout tp={config.tp}, "
                                     f"dp={self.dp_size}): {type(exc).__name__}: {exc}") from exc
        self.sleeping: set[str] = set()  # parts of vLLM's memory released: "weights", "kv_cache"
        self._replica_group = self._new_replica_groups() if config.tp > 1 else None
        self.last_sync: SyncStats | None = None

    def _new_replica_groups(self):
        """A gloo group per rollout replica (its ``tp`` ranks; every rank creates every group); returns
        this rank's."""
        import torch.distributed as dist

        mine = None
        for replica in range(self.dp_size):
            group = dist.new_group(list(range(replica * self.config.tp, (replica + 1) * self.config.tp)),
                                   backend="gloo")
            if replica == self.dp_rank:
                mine = group
        return mine

    def _check_same_requests(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                             seeds: Sequence[int] | None) -> None:
        """The ranks of a rollout replica must submit identical requests (vLLM's tensor-parallel workers
        run in lockstep; different requests deadlock them). A mismatch is an error naming the cause."""
        import hashlib

        import torch.distributed as dist

        digest = hashlib.sha256(repr((list(map(list, prompts)), list(seeds or []), sampling)).encode()).hexdigest()
        digests: list = [None] * self.config.tp
        dist.all_gather_object(digests, (digest, len(prompts)), group=self._replica_group)
        if len(set(digests)) > 1:
            raise RolloutEngineError(
                f"the {self.config.tp} ranks of rollout replica {self.dp_rank} submitted different requests "
                f"(prompt counts {[n for _, n in digests]}): their environments diverged (an environment that "
                "is not deterministic across processes, or one that failed on some ranks only); vLLM's "
                "tensor-parallel workers would deadlock on them")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        """Generate one completion per prompt (token ids in, token ids + log-probs out)."""
        from vllm import SamplingParams

        if self.sleeping:
            raise RolloutEngineError("generate() on a sleeping engine: call wake_up() first")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")

        def params(i: int) -> SamplingParams:
            seed = seeds[i] if seeds is not None else sampling.seed
            return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                                  logprobs=0, seed=seed, skip_special_tokens=False)

        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        if self._replica_group is not None:
            self._check_same_requests(prompts, sampling, seeds)
        try:
            outputs = self.llm.generate(requests, [params(i) for i in range(len(prompts))], use_tqdm=False)
        except Exception as exc:  # noqa: BLE001
            raise RolloutEngineError(f"vLLM generation failed for {len(prompts)} prompts: "
                                     f"{type(exc).__name__}: {exc}") from exc
        results = []
        for out in outputs:
            completion = out.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], token_ids)]
            if len(logprobs) != len(token_ids):
                raise RolloutEngineError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
            results.append(Generation(list(out.prompt_token_ids), token_ids, logprobs, completion.finish_reason))
        return results

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """vLLM's log-probs of ``sequences[i][starts[i]:]`` given the tokens before them (prompt
        log-probs of a one-token generation): how the engine scores fixed tokens."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        requests = [{"prompt_token_ids": list(s)} for s in sequences]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001
            raise RolloutEngineError(f"vLLM scoring failed: {type(exc).__name__}: {exc}") from exc
        scores = []
        for seq, start, out in zip(sequences, starts, outputs):
            entries = out.prompt_logprobs  # [None, {id: Logprob}, ...] one per prompt token
            scores.append([float(entries[j][seq[j]].logprob) for j in range(max(start, 1), len(seq))])
        return scores

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, source: MegatronWeightSource) -> SyncStats:
        """Load the trainer's current weights into every worker, in place. Collective: every
        rank calls it with its own shard of the model."""
        if "weights" in self.sleeping:  # the KV cache stays released until wake_up()
            self.llm.wake_up(tags=["weights"])
            self.sleeping.discard("weights")
        stats = SyncStats()
        start = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": source.flat_stream(stats)})
        except Exception as exc:  # noqa: BLE001
            raise RolloutEngineError(f"weight sync into vLLM failed after {stats.tensors} tensors: "
                                     f"{type(exc).__name__}: {exc}") from exc
        if not self.on_gpu:
            from megatron_sdar.patches import repack_cpu_weights_after_reload

            repack_cpu_weights_after_reload(self.llm)
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - start
        self.last_sync = stats
        return stats

    def sleep(self) -> None:
        """Release weights and KV cache (GPU) while the trainer runs."""
        if self.on_gpu and self.config.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Take the memory back for rollout (after :meth:`sync_weights`)."""
        if self.sleeping:
            self.llm.wake_up(tags=sorted(self.sleeping))
            self.sleeping.clear()

    def shutdown(self) -> None:
        """Tear vLLM down (before the process group is destroyed)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
