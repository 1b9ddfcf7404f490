"""Loss aggregation that is exact under context and data parallelism.

Token values arrive as ``[B, T_local]`` with a mask: under CP every rank holds a slice of each
sequence's tokens (Megatron's load-balanced split), under DP and micro-batching a subset of the
sequences. A per-rank mean would weight ranks wrongly, so the normalizers (token and sequence
counts of the whole global batch) are computed once per step with :meth:`LossNormalizers.from_mask`
and every micro-batch on every rank returns its **contribution**: the contributions summed over
micro-batches, CP ranks and DP ranks equal the single-process loss, and so do their gradients.

Modes (``x`` token values, ``m`` mask, ``N`` global token count, ``S`` global sequence count,
``n_i`` tokens of sequence ``i`` over all its CP slices):

* ``token-mean``:          ``sum_i sum_t m x / N``
* ``seq-mean-token-sum``:  ``sum_i (sum_t m x) / S``
* ``seq-mean-token-mean``: ``sum_i (sum_t m x / n_i) / S`` (sequences with no token add 0)

A sequence is a row of ``[B, T]``, or with packed rows (several samples back to back in a row) a
:class:`Segments` id: the sequence modes then sum per sample, not per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM over ``group`` (no-op without one); returns ``t``."""
    if _group_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def check_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Validate a token mask against a ``[B, T]`` value tensor; return it as float."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask.to(torch.float32)


@dataclass(frozen=True)
class LossNormalizers:
    """Global counts of one training step's batch (same value on every rank)."""

    num_tokens: float
    num_sequences: float

    @classmethod
    def from_mask(
        cls,
        mask: torch.Tensor,
        dp_cp_group: Optional[dist.ProcessGroup] = None,
        cp_group: Optional[dist.ProcessGroup] = None,
    ) -> "LossNormalizers":
        """From this rank's whole step mask ``[B_local, T_local]`` (all its micro-batches).

        ``dp_cp_group`` spans every rank holding different tokens of the step (Megatron's data
        parallel group with context parallelism); ``cp_group`` the ranks sharing sequences.
        """
        if mask.dim() != 2:
            raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
        counts = torch.tensor([float(mask.float().sum()), float(mask.shape[0])], dtype=torch.float64,
                              device=mask.device)
        all_reduce_sum(counts, dp_cp_group)
        # every CP rank of a sequence counted it once: undo that for the sequence count
        return cls(num_tokens=float(counts[0]), num_sequences=float(counts[1]) / _group_size(cp_group))


@dataclass(frozen=True)
class Segments:
    """Which sample each token of packed rows belongs to: ``ids [B, T_local]`` in ``0..count-1``
    (-1: padding); the same ``count`` samples, in the same order, on every CP rank of a micro-batch."""

    ids: torch.Tensor
    count: int


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalizers: LossNormalizers,
    cp_group: Optional[dist.ProcessGroup] = None,
    segments: Optional[Segments] = None,
) -> torch.Tensor:
    """This rank's contribution to the global ``mode`` aggregate of ``values [B, T_local]``
    (``segments``: the samples of packed rows; default: a row is a sequence)."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {mode!r}")
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    m = check_mask(mask, values)
    # where() rather than a product: a masked-out inf/nan must not leak into the loss
    masked = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token-mean":
        return masked.sum() / max(normalizers.num_tokens, 1.0)
    if segments is not None:
        ids = segments.ids.reshape(-1)
        keep = ids >= 0
        seq_sums = masked.new_zeros(segments.count).index_add(0, ids[keep], masked.reshape(-1)[keep])
        if mode == "seq-mean-token-sum":
            return seq_sums.sum() / max(normalizers.num_sequences, 1.0)
        counts = m.new_zeros(segments.count).index_add(0, ids[keep], m.reshape(-1)[keep].detach())
        seq_counts = all_reduce_sum(counts, cp_group)
        return (seq_sums / seq_counts.clamp_min(1.0)).sum() / max(normalizers.num_sequences, 1.0)
    seq_sums = masked.sum(-1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / max(normalizers.num_sequences, 1.0)
    seq_counts = all_reduce_sum(m.sum(-1).detach().clone(), cp_group)
    return (seq_sums / seq_counts.clamp_min(1.0)).sum() / max(normalizers.num_sequences, 1.0)


@torch.no_grad()
def masked_moments(
    values: torch.Tensor, mask: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> tuple[float, float, float]:
    """Global ``(mean, std, count)`` of ``values`` over unmasked tokens (population std)."""
    m = check_mask(mask, values)
    v = torch.where(m > 0, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    stats = torch.stack([v.sum(), (v * v).sum(), m.double().sum()])
    all_reduce_sum(stats, group)
    total, total_sq, count = (float(x) for x in stats)
    if count == 0:
        return 0.0, 0.0, 0.0
    mean = total / count
    return mean, max(total_sq / count - mean * mean, 0.0) ** 0.5, count
