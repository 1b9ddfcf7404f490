"""The trainer's weights as vLLM's ``WeightSource``: the Megatron -> HF exporter, in buckets.

Every iteration the rollout engine receives the policy's current weights without touching
disk. :class:`MegatronWeightSource` presents the live TP/PP-sharded Megatron model as the
re-iterable ``(hf_name, full_tensor)`` stream that vLLM's weight-transfer layer consumes
(``vllm.distributed.weight_transfer.base.WeightSource``): ``metadata()`` comes from the
architecture alone (no collective), iteration runs the exporter's TP all-gathers and PP
broadcasts, so **every rank of the model-parallel group must iterate in lockstep**.

How the stream reaches vLLM's workers:

- colocated (the default: vLLM runs inside the trainer's processes through vLLM's
  ``external_launcher`` executor, on CPU and on GPU): the worker's ``reload_weights`` reads the
  stream in place, one bucket at a time (:meth:`iter_buckets`); the tensors are the exporter's
  gathered buffers, so nothing is copied beyond what the model-parallel gather needs and vLLM's
  own load.
- rollout on other GPUs: give this source to one of vLLM's trainer-side transfer engines
  (NCCL broadcast, M2N resharding) with ``bucket_mb`` as their packed-buffer size; we do not
  write a transfer protocol of our own.

``bucket_mb`` bounds the bytes gathered ahead of the consumer: the exporter materializes
tensors until a bucket is full, the consumer loads the bucket, then the next bucket is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.exporter import iter_hf_weights
from megatron_sdar.models.weight_mapping import QwenWeightMapping

try:  # vLLM's interface when it is installed (it always is with the [vllm] extra)
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
except ImportError:  # pragma: no cover - the exporter still works without vLLM
    WeightSource = object  # type: ignore[misc,assignment]

    @dataclass(frozen=True)
    class ParamMeta:  # type: ignore[no-redef]
        name: str
        dtype: torch.dtype
        shape: tuple[int, ...]


@dataclass
class SyncStats:
    """What one weight sync moved: bytes, wall seconds, buckets, tensors."""

    bytes: int = 0
    seconds: float = 0.0
    buckets: int = 0
    tensors: int = 0

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_metrics(self) -> dict[str, float]:
        """Step metrics; wall-clock ones under ``perf/`` (they differ between identical runs)."""
        return {"rollout/weight_sync_bytes": float(self.bytes), "rollout/weight_sync_buckets": float(self.buckets),
                "perf/weight_sync_seconds": self.seconds, "perf/weight_sync_gbps": self.gbytes_per_s}


class MegatronWeightSource(WeightSource):
    """The live Megatron model (this rank's chunks) as a stream of full HF tensors.

    ``model_chunks``: this rank's model or virtual-pipeline chunks (DDP/Float16Module wrappers
    are fine). ``dtype``: the wire dtype the rollout engine expects (default: the model's).
    """

    def __init__(self, model_chunks, arch: QwenArchitecture, *, dtype: torch.dtype | None = None,
                 bucket_mb: float = 256.0) -> None:
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.model_chunks = model_chunks
        self.arch = arch
        self.dtype = dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._metadata: list[ParamMeta] | None = None

    def metadata(self) -> list[ParamMeta]:
        """Name, wire dtype and full shape of every HF tensor, in iteration order (no collective)."""
        if self._metadata is None:
            dtype = self.dtype or self.arch.torch_dtype_object()
            shapes = QwenWeightMapping(self.arch).hf_tensor_shapes()
            self._metadata = [ParamMeta(name, dtype, tuple(shape)) for name, shape in shapes.items()]
        return self._metadata

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_hf_weights(self.model_chunks, self.arch, target="all"):
            if self.dtype is not None and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            yield name, tensor

    def iter_buckets(self, stats: SyncStats | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The stream cut into buckets of at most ``bucket_mb`` (a tensor larger than a bucket
        travels alone). ``stats`` accumulates bytes, tensors and buckets."""
        bucket: list[tuple[str, torch.Tensor]] = []
        filled = 0
        for name, tensor in self:
            size = tensor.numel() * tensor.element_size()
            if bucket and filled + size > self.bucket_bytes:
                yield bucket
                bucket, filled = [], 0
            bucket.append((name, tensor))
            filled += size
            if stats is not None:
                stats.bytes += size
                stats.tensors += 1
        if bucket:
            yield bucket

    def flat_stream(self, stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
        """The bucketed stream flattened back to pairs (what ``reload_weights`` consumes),
        counting buckets in ``stats``."""
        for bucket in self.iter_buckets(stats):
            stats.buckets += 1
            yield from bucket
