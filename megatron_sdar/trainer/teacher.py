"""The teacher: its batch (the sequences SDAR's teacher pass scores) and its weights, each built in
one place.

The teacher is the policy itself given privileged context (retrieved skills). For each scored turn
its sequence is the turn's stored chat messages re-rendered with the episode's privileged context
(:meth:`~megatron_sdar.rollout.agent_loop.ChatFormatter.teacher_messages`), followed by the same
response tokens the student produced. The rollout stores only what the student saw (messages and
token ids) and the episode's context; the teacher's prompt is rendered here, once per step, for the
samples whose teacher values some term reads (:func:`teacher_indices`), so a GRPO step renders and
scores nothing.

The batch's sequences are :class:`~megatron_sdar.trainer.batch.TrainingSample` s, so the teacher
pass packs them with the same planner as every other pass (keeping each sample's DP rank of the
step), and its per-token values map back to the step's samples with :meth:`TeacherBatch.step_tables`.

The teacher's *weights* (``algo.teacher``, :class:`TeacherWeights`): ``shared``, the policy that
sampled the rollout, as the SDAR release; ``frozen``, the policy at the start of RL, which is the KL
reference model (no second copy); ``ema``, an exponential moving average of the policy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_sdar.algo.objective import ObjectiveConfig
from megatron_sdar.trainer.batch import TrainingSample

# forward-pass outputs -> the objective's teacher inputs (TokenInputs fields)
_TEACHER_INPUTS = {"logprobs": "teacher_logprobs", "topk_logprobs": "teacher_topk_logprobs",
                   "topk_ids": "teacher_topk_ids", "logits": "teacher_logits"}


def teacher_indices(samples: list[TrainingSample], objective: ObjectiveConfig) -> list[int]:
    """The samples the teacher pass scores: the distillation samples, and with RLSD's token
    weighting every RL sample (none when the objective has no teacher term)."""
    if not objective.needs_teacher:
        return []
    return [i for i, s in enumerate(samples)
            if (s.distill and objective.distill_coef > 0) or (s.rl and objective.rlsd_coef > 0)]


@dataclass
class TeacherBatch:
    """``indices[j]``: the step's sample that teacher sequence ``sequences[j]`` belongs to;
    ``sequences[j]``: [P'_j + R_j] privileged prompt + the sample's response (``response_start`` =
    P'_j), with the sample's flags and advantage."""

    indices: list[int]
    sequences: list[TrainingSample]

    @classmethod
    def build(cls, samples: list[TrainingSample], objective: ObjectiveConfig,
              prompts: Callable[[list[int]], list[list[int]]]) -> "TeacherBatch":
        """``prompts(indices)``: the teacher's prompt ids of those samples (called once, with the
        scored samples only)."""
        indices = teacher_indices(samples, objective)
        sequences = []
        for i, prompt in zip(indices, prompts(indices) if indices else [], strict=True):
            sample = samples[i]
            response = sample.input_ids[sample.response_start:]
            sequences.append(dataclasses.replace(sample, input_ids=list(prompt) + response, response_start=len(prompt),
                                                 messages=[], privileged_context=""))
        return cls(indices, sequences)

    @classmethod
    def from_messages(cls, samples: list[TrainingSample], objective: ObjectiveConfig, formatter) -> "TeacherBatch":
        """The teacher's prompts rendered from each sample's stored messages and privileged context
        with ``formatter`` (the rollout's :class:`~megatron_sdar.rollout.agent_loop.ChatFormatter`:
        the same chat template and context placement, so the ids equal what the engine would see)."""
        def prompts(indices: list[int]) -> list[list[int]]:
            if missing := [i for i in indices if not samples[i].messages]:
                raise ValueError(f"samples {missing[:8]} have no stored messages: the teacher's prompt cannot be "
                                 "rendered (samples for a teacher pass come from rollout turns)")
            return formatter.encode_many([formatter.teacher_messages(samples[i].messages, samples[i].privileged_context)
                                          for i in indices])

        return cls.build(samples, objective, prompts)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    def step_tables(self, values: dict[str, dict[int, torch.Tensor]]) -> dict[str, dict[int, torch.Tensor]]:
        """The teacher pass's ``{output: {j: [R_j, ...]}}`` as the objective's teacher inputs keyed by
        the step's sample index (``teacher_logprobs``, ``teacher_topk_*``, ``teacher_logits``)."""
        return {_TEACHER_INPUTS[name]: {self.indices[j]: v for j, v in by_position.items()}
                for name, by_position in values.items()}


class TeacherWeights:
    """The weights that score the teacher batch (``ObjectiveConfig.teacher``).

    * ``shared``: the policy's own chunks, before the step's update: the rollout-time weights (the
      SDAR release). The teacher moves with the student, so the two can drift together to a state
      where the skills no longer matter.
    * ``frozen``: the policy at the start of RL, the weights of the KL reference model
      (``reference()``: built once, shared with the reference pass; a frozen teacher of OPSD, verl
      PR #6909).
    * ``ema``: ``theta_T <- d * theta_T + (1 - d) * theta`` after every applied optimizer step, from
      the policy at the start of RL (:meth:`start`); an EMA teacher of OPSD, NeMo-RL PR #2063. Its
      chunks are a frozen copy of the policy in the policy's dtype; with bf16 / fp16 weights an fp32
      shadow holds the average (a 1% step is below bf16's resolution). Training checkpoints carry
      its chunks (:meth:`checkpoint_models`); a resume of a bf16 run restarts the shadow from them.
    """

    def __init__(self, kind: str, policy, reference: Callable[[], list], ema_decay: float) -> None:
        self.kind = kind
        self.policy = policy
        self.reference = reference
        self.decay = ema_decay
        self.ema: list | None = policy.frozen_copy() if kind == "ema" else None
        self._shadow: list[torch.Tensor] | None = None

    def model(self) -> list:
        """The model chunks the teacher pass runs."""
        if self.kind == "shared":
            return self.policy.model
        if self.kind == "frozen":
            return self.reference()
        return self.ema

    def _ema_params(self) -> list[torch.Tensor]:
        return [p for chunk in self.ema for p in chunk.parameters()]

    def start(self) -> None:
        """At the start of RL: the EMA starts from the policy's weights."""
        if self.ema is None:
            return
        from megatron_sdar.trainer.policy import copy_weights

        copy_weights(self.policy.unwrapped(), self.ema)
        self.loaded()

    def loaded(self) -> None:
        """After the EMA chunks were set (start, or a checkpoint load): the fp32 shadow from them."""
        params = self._ema_params() if self.ema is not None else []
        self._shadow = [p.detach().float().clone() for p in params] if any(
            p.dtype != torch.float32 for p in params) else None

    @torch.no_grad()
    def after_step(self) -> None:
        """After an applied optimizer step: the EMA update (nothing for ``shared`` / ``frozen``)."""
        if self.ema is None:
            return
        policy = [p for chunk in self.policy.unwrapped() for p in chunk.parameters()]
        targets = self._shadow if self._shadow is not None else self._ema_params()
        for average, current in zip(targets, policy, strict=True):
            average.mul_(self.decay).add_(current.detach().to(average.dtype), alpha=1.0 - self.decay)
        if self._shadow is not None:
            for param, average in zip(self._ema_params(), self._shadow, strict=True):
                param.copy_(average)

    def checkpoint_models(self) -> dict[str, list]:
        """Frozen model chunks a training checkpoint must carry beside the policy: the EMA's."""
        from megatron_sdar.checkpoint.model import EMA_TEACHER_WEIGHTS

        return {EMA_TEACHER_WEIGHTS: self.ema} if self.ema is not None else {}
