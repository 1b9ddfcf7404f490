"""From trajectories to padded micro-batches for Megatron's schedules.

A :class:`TrainingSample` is one turn: the student sequence (prompt + response), and the stored
messages and privileged context the teacher's sequence is rendered from
(:class:`~megatron_sdar.trainer.teacher.TeacherBatch`). Every pass over the samples
(teacher, reference, student) builds :class:`MicroBatch` es with the same assignment of samples to
data-parallel ranks (:func:`assign_ranks`, once per step), so per-token values computed in one pass
(``[R]`` per sample, indexed by response position) can be scattered into the next pass's layout.

Layout of a pass: rows of one length ``S`` (the longest sample, a multiple of 8, of ``2 * cp``
and of ``tp`` with sequence parallelism), a fixed number of rows per micro-batch (padding rows
have an all-zero mask), this rank's context-parallel slice of the positions (Megatron's
load-balanced split). Without packing a row is one right-padded sample; with packing
(``micro_batch_tokens``) a row holds several samples back to back under a block-diagonal causal
mask, and a micro-batch is bounded by a token budget (:func:`plan_pass`). Token ``j`` predicts
token ``j + 1``; the loss mask is 1 where ``j + 1`` is a model-generated token of the same sample.

Packed and padded passes give the same loss and gradients to float rounding: attention never
crosses a sample (the mask), and rotary embeddings depend only on relative positions, so a sample
at offset ``o`` in a row sees what it sees at offset 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sdar.algo.grpo import group_advantages
from megatron_sdar.rollout.trajectory import Episode, TrajectoryBatch, Turn
from megatron_sdar.utils.distributed import cp_token_indices


@dataclass
class TrainingSample:
    """One turn. ``input_ids``: [P + R] prompt + response, ``response_start`` = P;
    ``rollout_logprobs``: [R] the engine's log-probs of the response; ``advantage``: the episode's
    group-normalized advantage (0 for SFT); ``action_mask``: [R] 1 on the response tokens that
    spell the action (empty: unknown); ``messages``: the chat messages the prompt was rendered from
    and ``privileged_context``: the episode's retrieved skills (the teacher's prompt is rendered from
    both; empty for demonstrations).
    ``rl``: its tokens enter the RL terms (policy gradient, KL, entropy); ``distill``: they enter
    the distillation term (and the teacher pass scores it). Both for SDAR's samples; HDPO's
    ordinary samples are RL only, its successful rescue turns distillation only."""

    input_ids: list[int]
    response_start: int
    rollout_logprobs: list[float]
    advantage: float = 0.0
    episode: int = 0
    action_mask: list[int] = field(default_factory=list)
    rl: bool = True
    distill: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)
    privileged_context: str = ""

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def samples_from_trajectories(batch: TrajectoryBatch, norm_by_std: bool = True,
                              distill: bool = True) -> list[TrainingSample]:
    """Every turn of every played episode, with the GRPO advantage of its episode (RL samples; also
    distillation samples when ``distill``). An episode that failed in the environment
    (:attr:`~megatron_sdar.rollout.trajectory.Episode.failed_in_env`) gives no sample and is no member
    of its group: its reward (0, or less with penalties) says nothing about the policy, and counted as
    a failure it would push its group's other episodes up. ``TrainingSample.episode`` stays the
    episode's index in ``batch.episodes``."""
    played = [i for i, e in enumerate(batch.episodes) if not e.failed_in_env]
    if not played:
        return []
    rewards = torch.tensor([batch.episodes[i].reward for i in played], dtype=torch.float64)
    groups = torch.tensor([batch.episodes[i].group for i in played])
    advantages = dict(zip(played, group_advantages(rewards, groups, norm_by_std=norm_by_std).tolist()))
    return [_sample(turn, batch.episodes[index], index, float(advantages[index]), rl=True, distill=distill)
            for index, turn in batch.turns() if index in advantages and turn.response_ids]


def rescue_samples(rescue: TrajectoryBatch) -> list[TrainingSample]:
    """HDPO: the turns of the successful rescue episodes, as distillation-only samples. Their student
    sequence is the prompt without the skills + the response generated with them; the teacher's
    (rendered by :class:`~megatron_sdar.trainer.teacher.TeacherBatch`) is the prompt the engine saw,
    skills included, + the same response."""
    return [_sample(turn, rescue.episodes[index], index, 0.0, rl=False, distill=True)
            for index, turn in rescue.turns()
            if rescue.episodes[index].won and not rescue.episodes[index].failed_in_env and turn.response_ids]


def _sample(turn: Turn, episode: Episode, index: int, advantage: float, *, rl: bool, distill: bool) -> TrainingSample:
    return TrainingSample(
        input_ids=turn.prompt_ids + turn.response_ids, response_start=len(turn.prompt_ids),
        rollout_logprobs=list(turn.rollout_logprobs), advantage=advantage, episode=index,
        action_mask=list(turn.action_mask), rl=rl, distill=distill, messages=turn.messages,
        privileged_context=episode.privileged_context)


@dataclass
class PassLayout:
    """Shapes and sample placement shared by every micro-batch of one pass on every rank.

    ``rows[m][b]``: the samples packed, in order, into row ``b`` of this rank's micro-batch ``m``
    (empty: a padding row). Without packing each row holds at most one sample."""

    seq_len: int  # S, global (before the CP split)
    micro_batch_size: int  # rows per micro-batch
    num_micro_batches: int  # per data-parallel rank (the same on every rank)
    dp_size: int
    dp_rank: int
    cp_size: int = 1
    cp_rank: int = 0
    rows: list[list[list[int]]] = field(default_factory=list)
    packed: bool = False
    real_tokens: int = 0  # tokens of every sample of the pass (all DP ranks)
    thd: bool = False  # packed rows go to Transformer Engine as one THD sequence per micro-batch
    seq_lens: list[int] = field(default_factory=list)  # row length of each micro-batch (<= seq_len)
    padded_tokens: int = 0  # tokens the pass computes on all DP ranks, padding included


def _align(lengths: list[int], cp_size: int, multiple: int) -> int:
    align = math.lcm(8, 2 * cp_size if cp_size > 1 else 1, multiple)  # 8: fewer distinct shapes
    return -(-max(lengths) // align) * align


def _pack_rows(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: samples (longest first) into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(order, key=lambda i: (-lengths[i], i)):
        slot = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if slot is None:
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        free[slot] -= lengths[index]
    return rows


def assign_ranks(lengths: list[int], dp_size: int, balance: bool) -> list[int]:
    """The data-parallel rank of each sample: round-robin, or (``balance``) each sample, longest
    first, to the rank with the fewest tokens so far. A step computes it once, from the student
    sequences, and every pass keeps it: per-token values of one pass are read by the next on the
    rank that owns the sample."""
    if not balance:
        return [i % dp_size for i in range(len(lengths))]
    owners, loads = [0] * len(lengths), [0] * dp_size
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += lengths[index]
    return owners


def plan_pass(lengths: list[int], micro_batch_size: int, dp_size: int, dp_rank: int, cp_size: int = 1,
              cp_rank: int = 0, multiple: int = 1, micro_batch_multiple: int = 1,
              micro_batch_tokens: int | None = None, owners: list[int] | None = None,
              uniform_seq_len: bool = False) -> PassLayout:
    """The layout for sequences of ``lengths`` (every rank passes the same list and gets the same
    plan). ``multiple``: the sequence length's (TP with sequence parallelism);
    ``micro_batch_multiple``: the number of micro-batches' (the interleaved pipeline schedule runs
    groups of ``pp`` micro-batches per virtual stage; extra micro-batches are padding rows);
    ``owners``: each sample's DP rank (default :func:`assign_ranks`).

    Without ``micro_batch_tokens``: one sample per row, ``micro_batch_size`` rows per micro-batch.
    With it (packing, as verl's dynamic batch size): a rank's samples are packed
    first-fit-decreasing into rows of ``S`` tokens (``S``: the longest sample, aligned), and a
    micro-batch holds at most ``micro_batch_tokens`` tokens (at least one row). Every rank gets the
    same number of micro-batches (Megatron's schedules need it); rows are spread evenly over them,
    longest first, and each packed micro-batch is as long as its longest row (aligned), so similar
    lengths share a micro-batch. ``uniform_seq_len`` (pipeline parallelism: the stages exchange
    tensors of one shape): every micro-batch ``S`` long."""
    if not lengths:
        raise ValueError("no samples to train on")
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    seq_len = _align(lengths, cp_size, multiple)
    packed = micro_batch_tokens is not None
    owners = owners if owners is not None else assign_ranks(lengths, dp_size, balance=packed)
    if len(owners) != len(lengths) or any(not 0 <= r < dp_size for r in owners):
        raise ValueError(f"owners must give a rank in [0, {dp_size}) for each of the {len(lengths)} samples")
    mine_by_rank = [[i for i in range(len(lengths)) if owners[i] == r] for r in range(dp_size)]
    if packed:
        rows_by_rank = [_pack_rows(mine, lengths, seq_len) for mine in mine_by_rank]
        rows_cap = max(1, micro_batch_tokens // seq_len)
    else:
        rows_by_rank = [[[i] for i in mine] for mine in mine_by_rank]
        rows_cap = micro_batch_size
    most_rows = max(1, max(len(rows) for rows in rows_by_rank))
    num_micro = -(-most_rows // rows_cap)
    num_micro = -(-num_micro // micro_batch_multiple) * micro_batch_multiple
    if packed:  # the count (up to twice the fewest) whose equal shares leave the fewest empty rows
        candidates = range(num_micro, 2 * num_micro + 1, micro_batch_multiple)
        num_micro = min(candidates, key=lambda m: (m * -(-most_rows // m), m))
    rows_per_micro = -(-most_rows // num_micro) if packed else micro_batch_size
    def split(rank_rows: list[list[int]]) -> tuple[list[list[list[int]]], list[int]]:
        if packed:  # longest rows first: a micro-batch holds rows of similar lengths
            rank_rows = sorted(rank_rows, key=lambda row: -sum(lengths[i] for i in row))
        padded = rank_rows + [[] for _ in range(num_micro * rows_per_micro - len(rank_rows))]
        chunks = [padded[m * rows_per_micro:(m + 1) * rows_per_micro] for m in range(num_micro)]
        if not packed or uniform_seq_len:
            return chunks, [seq_len] * num_micro
        fills = [max([sum(lengths[i] for i in row) for row in chunk] + [1]) for chunk in chunks]
        return chunks, [_align([fill], cp_size, multiple) for fill in fills]

    plans = [split(rank_rows) for rank_rows in rows_by_rank]
    rows, seq_lens = plans[dp_rank]
    computed = sum(length * rows_per_micro for _, lens in plans for length in lens)
    return PassLayout(max(seq_lens), rows_per_micro, num_micro, dp_size, dp_rank, cp_size, cp_rank, rows,
                      packed=packed, real_tokens=sum(lengths), seq_lens=seq_lens, padded_tokens=computed)


@dataclass
class MicroBatch:
    """One micro-batch on this rank. ``[B, S_local]`` tensors are this rank's CP slice."""

    tokens: torch.Tensor  # [B, S_local] input ids
    position_ids: torch.Tensor  # [B, S_local] global positions in the row
    targets: torch.Tensor  # [B, S_local] next-token ids
    loss_mask: torch.Tensor  # [B, S_local] 1 where the target is model-generated (RL samples)
    samples: list[int]  # the samples in this micro-batch, in row order
    segments: torch.Tensor  # [B, S_local] index into ``samples`` of each token's sample (-1: padding)
    advantages: torch.Tensor  # [B, S_local] the episode advantage of each token's sample
    response_pos: torch.Tensor  # [B, S_local] index k of the response token predicted here (-1: none)
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, S_local] or [B, S_local, k]
    prompt_mask: torch.Tensor | None = None  # [B, S_local] 1 where the target is a prompt token
    distill_mask: torch.Tensor | None = None  # [B, S_local] 1 where the target is model-generated (distillation)
    attention_mask: torch.Tensor | None = None  # [B, 1, S, S] True = masked (rows of 2+ samples); None: causal


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` block-diagonal causal mask (``True`` = masked, Megatron's convention) of rows
    whose tokens belong to the samples ``segments [B, S]`` (global order): a token sees the earlier
    tokens of its own sample. Padding tokens (-1) see the padding before them (never used)."""
    S = segments.shape[-1]
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    other = segments[:, :, None] != segments[:, None, :]
    return (other | causal)[:, None]


def thd_packed_seq_params(segments: torch.Tensor, device=None):
    """Megatron's ``PackedSeqParams`` (THD, Transformer Engine's packed attention) for packed rows
    ``segments [B, S]`` laid end to end as one ``[1, B * S]`` sequence: every sample is a sequence,
    and so is the padding at the end of a row (it attends only to itself; its outputs are masked)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = segments.reshape(-1)
    row = torch.arange(segments.numel()) // segments.shape[1]
    # a new sequence starts wherever the (row, segment) pair changes
    key = row * (segments.max().item() + 2) + (flat + 1)
    starts = torch.nonzero(torch.cat([torch.tensor([True]), key[1:] != key[:-1]])).view(-1)
    cu_seqlens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu_seqlens = cu_seqlens.to(device) if device is not None else cu_seqlens
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def build_micro_batches(samples: list[TrainingSample], layout: PassLayout, *,
                        per_token: Optional[dict[str, dict[int, torch.Tensor]]] = None,
                        pad_id: int = 0) -> list[MicroBatch]:
    """This rank's micro-batches of a pass. ``per_token[name][sample] = [R, ...]`` values indexed by
    response position are scattered to the positions that predict those tokens. In packed rows a
    sample's last token predicts the next sample's first: that target is never in a mask."""
    per_token = per_token or {}
    out = []
    for rows, S in zip(layout.rows, layout.seq_lens, strict=True):
        local = (cp_token_indices(S, layout.cp_size, layout.cp_rank) if layout.cp_size > 1
                 else torch.arange(S))
        B = len(rows)
        tokens = torch.full((B, S + 1), pad_id, dtype=torch.long)
        response_pos = torch.full((B, S), -1, dtype=torch.long)
        segments = torch.full((B, S), -1, dtype=torch.long)
        prompt_mask, rl, distill, advantages = (torch.zeros((B, S)) for _ in range(4))
        values = {name: None for name in per_token}
        members: list[int] = []
        for b, row in enumerate(rows):
            offset = 0
            for index in row:
                sample = samples[index]
                ids, start = sample.input_ids, sample.response_start
                end = offset + len(ids)
                if end > S:
                    raise ValueError(f"row {b} needs {end} tokens, more than the pass length {S}")
                tokens[b, offset:end] = torch.tensor(ids)
                n_resp = len(ids) - start
                first = offset + start - 1  # the position that predicts the first response token
                response_pos[b, first:first + n_resp] = torch.arange(n_resp)
                prompt_mask[b, offset:first] = 1.0
                segments[b, offset:end] = len(members)
                advantages[b, offset:end] = sample.advantage
                rl[b, first:first + n_resp], distill[b, first:first + n_resp] = float(sample.rl), float(sample.distill)
                for name, by_sample in per_token.items():
                    v = by_sample.get(index)
                    if v is None:  # not scored by that pass (HDPO's teacher scores only rescue turns)
                        continue
                    if values[name] is None:
                        values[name] = torch.zeros((B, S, *v.shape[1:]), dtype=v.dtype)
                    values[name][b, first:first + n_resp] = v
                members.append(index)
                offset = end
        for name in per_token:
            if values[name] is None:  # only padding rows
                any_value = next(iter(per_token[name].values()))
                values[name] = torch.zeros((B, S, *any_value.shape[1:]), dtype=any_value.dtype)
        out.append(MicroBatch(
            tokens=tokens[:, :S][:, local], position_ids=local.expand(B, -1).clone(),
            targets=tokens[:, 1:][:, local], loss_mask=rl[:, local], distill_mask=distill[:, local],
            samples=members, segments=segments[:, local], advantages=advantages[:, local],
            response_pos=response_pos[:, local], per_token={name: v[:, local] for name, v in values.items()},
            prompt_mask=prompt_mask[:, local],
            # a row with one sample needs no block mask: the causal one keeps its tokens off the padding
            attention_mask=packed_attention_mask(segments) if any(len(row) > 1 for row in rows) else None))
    return out


def rollout_logprob_table(samples: list[TrainingSample]) -> dict[int, torch.Tensor]:
    """``{sample: [R]}`` of the rollout engine's log-probs (scattered like any per-token value)."""
    return {i: torch.tensor(s.rollout_logprobs, dtype=torch.float32) for i, s in enumerate(samples)}


def action_mask_table(samples: list[TrainingSample]) -> dict[int, torch.Tensor] | None:
    """``{sample: [R]}`` of the action-token masks, or None when no sample has one."""
    if not any(s.action_mask for s in samples):
        return None
    return {i: torch.tensor(s.action_mask or [0] * s.num_response_tokens, dtype=torch.float32)
            for i, s in enumerate(samples)}
