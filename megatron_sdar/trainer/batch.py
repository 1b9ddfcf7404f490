"""From trajectories to padded micro-batches for Megatron's schedules.

A :class:`TrainingSample` is one turn: the student sequence (prompt + response) and the teacher
sequence (privileged context + the same prompt + the same response). Every pass over the samples
(teacher, reference, student) builds :class:`MicroBatch` es with the same assignment of samples to
data-parallel ranks, so per-token values computed in one pass (``[R]`` per sample, indexed by
response position) can be scattered into the next pass's layout.

Layout of a pass: sequences right-padded to one length ``S`` (a multiple of ``2 * cp`` and of
``tp`` with sequence parallelism), ``micro_batch_size`` rows per micro-batch (padding rows have
an all-zero mask), this rank's context-parallel slice of the positions (Megatron's
load-balanced split). Token ``j`` predicts token ``j + 1``; the loss mask is 1 where ``j + 1``
is a model-generated token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sdar.algo.grpo import group_advantages
from megatron_sdar.rollout.trajectory import TrajectoryBatch
from megatron_sdar.utils.distributed import cp_token_indices


@dataclass
class TrainingSample:
    """One turn. ``advantage``: the episode's group-normalized advantage (0 for SFT);
    ``action_mask``: [R] 1 on the response tokens that spell the action (empty: unknown).
    ``rl``: its tokens enter the RL terms (policy gradient, KL, entropy); ``distill``: they enter
    the distillation term (and the teacher pass scores it). Both for SDAR's samples; HDPO's
    ordinary samples are RL only, its successful rescue turns distillation only."""

    input_ids: list[int]
    response_start: int
    teacher_input_ids: list[int]
    teacher_response_start: int
    rollout_logprobs: list[float]
    advantage: float = 0.0
    episode: int = 0
    action_mask: list[int] = field(default_factory=list)
    rl: bool = True
    distill: bool = True

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def samples_from_trajectories(batch: TrajectoryBatch, norm_by_std: bool = True,
                              distill: bool = True) -> list[TrainingSample]:
    """Every turn of every episode, with the GRPO advantage of its episode (RL samples; also
    distillation samples when ``distill``)."""
    if not batch.episodes:
        return []
    rewards = torch.tensor([e.reward for e in batch.episodes], dtype=torch.float64)
    groups = torch.tensor([e.group for e in batch.episodes])
    advantages = group_advantages(rewards, groups, norm_by_std=norm_by_std).tolist()
    return [_sample(turn, index, float(advantages[index]), rl=True, distill=distill)
            for index, turn in batch.turns() if turn.response_ids]


def rescue_samples(rescue: TrajectoryBatch) -> list[TrainingSample]:
    """HDPO: the turns of the successful rescue episodes, as distillation-only samples. Their student
    sequence is the prompt without the skills + the response generated with them; the teacher's, the
    prompt the engine saw (skills included) + the same response."""
    return [_sample(turn, index, 0.0, rl=False, distill=True)
            for index, turn in rescue.turns() if rescue.episodes[index].won and turn.response_ids]


def _sample(turn, episode: int, advantage: float, *, rl: bool, distill: bool) -> TrainingSample:
    return TrainingSample(
        input_ids=turn.prompt_ids + turn.response_ids, response_start=len(turn.prompt_ids),
        teacher_input_ids=turn.teacher_prompt_ids + turn.response_ids,
        teacher_response_start=len(turn.teacher_prompt_ids), rollout_logprobs=list(turn.rollout_logprobs),
        advantage=advantage, episode=episode, action_mask=list(turn.action_mask), rl=rl, distill=distill)


@dataclass
class PassLayout:
    """Shapes shared by every micro-batch of one pass on every rank."""

    seq_len: int  # S, global (before the CP split)
    micro_batch_size: int
    num_micro_batches: int  # per data-parallel rank
    dp_size: int
    dp_rank: int
    cp_size: int = 1
    cp_rank: int = 0

    def rows_of_rank(self, num_samples: int) -> list[Optional[int]]:
        """Sample index of each row this rank processes (None: padding row), round-robin over DP."""
        total = self.num_micro_batches * self.micro_batch_size
        return [i if i < num_samples else None
                for i in (self.dp_rank + k * self.dp_size for k in range(total))]


def plan_pass(lengths: list[int], micro_batch_size: int, dp_size: int, dp_rank: int, cp_size: int = 1,
              cp_rank: int = 0, multiple: int = 1, micro_batch_multiple: int = 1) -> PassLayout:
    """The layout for sequences of ``lengths`` (every rank passes the same list). ``multiple``: the
    sequence length's (TP with sequence parallelism); ``micro_batch_multiple``: the number of
    micro-batches' (the interleaved pipeline schedule runs groups of ``pp`` micro-batches per
    virtual stage; the extra micro-batches are padding rows with an all-zero mask)."""
    if not lengths:
        raise ValueError("no samples to train on")
    align = math.lcm(8, 2 * cp_size if cp_size > 1 else 1, multiple)  # 8: fewer distinct shapes
    seq_len = -(-max(lengths) // align) * align
    per_rank = -(-len(lengths) // dp_size)
    num_micro = -(-per_rank // micro_batch_size)
    num_micro = -(-num_micro // micro_batch_multiple) * micro_batch_multiple
    return PassLayout(seq_len, micro_batch_size, num_micro, dp_size, dp_rank, cp_size, cp_rank)


@dataclass
class MicroBatch:
    """One micro-batch on this rank. ``[B, S_local]`` tensors are this rank's CP slice."""

    tokens: torch.Tensor  # [B, S_local] input ids
    position_ids: torch.Tensor  # [B, S_local] global positions
    targets: torch.Tensor  # [B, S_local] next-token ids
    loss_mask: torch.Tensor  # [B, S_local] 1 where the target is model-generated (RL samples)
    sample_index: list[Optional[int]]  # [B] row -> sample (None: padding row)
    advantages: torch.Tensor  # [B]
    response_pos: torch.Tensor  # [B, S_local] index k of the response token predicted here (-1: none)
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, S_local] or [B, S_local, k]
    prompt_mask: torch.Tensor | None = None  # [B, S_local] 1 where the target is a prompt token
    distill_mask: torch.Tensor | None = None  # [B, S_local] 1 where the target is model-generated (distillation)


def build_micro_batches(samples: list[TrainingSample], layout: PassLayout, *, teacher: bool = False,
                        per_token: Optional[dict[str, dict[int, torch.Tensor]]] = None,
                        pad_id: int = 0) -> list[MicroBatch]:
    """This rank's micro-batches of a pass. ``per_token[name][sample] = [R, ...]`` values indexed by
    response position are scattered to the positions that predict those tokens."""
    per_token = per_token or {}
    rows = layout.rows_of_rank(len(samples))
    S = layout.seq_len
    local = (cp_token_indices(S, layout.cp_size, layout.cp_rank) if layout.cp_size > 1
             else torch.arange(S))
    out = []
    for m in range(layout.num_micro_batches):
        chunk = rows[m * layout.micro_batch_size:(m + 1) * layout.micro_batch_size]
        B = len(chunk)
        tokens = torch.full((B, S + 1), pad_id, dtype=torch.long)
        response_pos = torch.full((B, S), -1, dtype=torch.long)
        prompt_mask = torch.zeros((B, S))
        rl_rows, distill_rows = torch.zeros(B, 1), torch.zeros(B, 1)
        advantages = torch.zeros(B)
        values = {name: None for name in per_token}
        for b, index in enumerate(chunk):
            if index is None:
                continue
            sample = samples[index]
            ids = sample.teacher_input_ids if teacher else sample.input_ids
            start = sample.teacher_response_start if teacher else sample.response_start
            if len(ids) > S:
                raise ValueError(f"sample {index} has {len(ids)} tokens, more than the pass length {S}")
            tokens[b, :len(ids)] = torch.tensor(ids)
            n_resp = len(ids) - start
            response_pos[b, start - 1:start - 1 + n_resp] = torch.arange(n_resp)
            prompt_mask[b, :start - 1] = 1.0
            advantages[b] = sample.advantage
            rl_rows[b], distill_rows[b] = float(sample.rl), float(sample.distill)
            for name, by_sample in per_token.items():
                v = by_sample.get(index)
                if v is None:  # not scored by that pass (HDPO's teacher scores only rescue turns)
                    continue
                if values[name] is None:
                    values[name] = torch.zeros((B, S, *v.shape[1:]), dtype=v.dtype)
                values[name][b, start - 1:start - 1 + n_resp] = v
        for name in per_token:
            if values[name] is None:  # only padding rows
                any_value = next(iter(per_token[name].values()))
                values[name] = torch.zeros((B, S, *any_value.shape[1:]), dtype=any_value.dtype)
        generated = (response_pos >= 0).float()
        out.append(MicroBatch(
            tokens=tokens[:, :S][:, local], position_ids=local.expand(B, -1).clone(),
            targets=tokens[:, 1:][:, local], loss_mask=(generated * rl_rows)[:, local],
            distill_mask=(generated * distill_rows)[:, local],
            sample_index=list(chunk), advantages=advantages, response_pos=response_pos[:, local],
            per_token={name: v[:, local] for name, v in values.items()}, prompt_mask=prompt_mask[:, local]))
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
