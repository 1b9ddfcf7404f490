"""The SDAR objective: one config-driven loss for every preset of the paper and its baselines.

``L = pg_coef * agg(w_t * pg_t) + kl_coef * agg(kl_t) + lambda(step) * agg(g_t * d_t)
      - entropy_coef * agg(H_t)``

* ``pg_t``: PPO clipped surrogate with token advantages (the episode's group-normalized
  advantage, re-weighted by the self-divergence for ``rlsd``), ``w_t`` the truncated importance
  weights when ``tis_cap`` is set (else 1);
* ``kl_t``: KL-to-reference estimator (k1/k2/k3);
* ``g_t * d_t``: the gated distillation term (:mod:`megatron_sdar.algo.gates`), ``d_t`` the
  sampled-token term ``lpT - lpS`` (estimator ``sampled``, the paper's) or an exact
  full-vocabulary (``full``) or top-k + tail (``topk``) divergence;
* ``agg``: ``token-mean`` / ``seq-mean-token-sum`` / ``seq-mean-token-mean`` with global
  normalizers (:mod:`megatron_sdar.algo.aggregation`), exact under CP and DP.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sdar.algo.aggregation import LOSS_AGG_MODES, LossNormalizers, aggregate, check_mask, masked_moments
from megatron_sdar.algo.gates import GATES, compute_gate, gated_distillation
from megatron_sdar.algo.grpo import (
    KL_ESTIMATORS,
    kl_penalty,
    ppo_clip_loss,
    self_divergence_advantages,
    truncated_is_weights,
)
from megatron_sdar.algo.vocab_parallel import (
    DEFAULT_CHUNK_SIZE,
    DIVERGENCES,
    topk_tail_divergence,
    vocab_parallel_divergence,
    vocab_parallel_logprobs_entropy,
)

ESTIMATORS = ("sampled", "full", "topk")
SCHEDULES = ("constant", "linear_decay", "cosine_decay")


@dataclass
class ObjectiveConfig:
    """Knobs of the objective; presets in :data:`PRESETS` set a few of them."""

    pg_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: clip-higher
    dual_clip: Optional[float] = None
    kl_coef: float = 0.01  # 0.001 for search tasks
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    norm_adv_by_std: bool = True
    tis_cap: Optional[float] = None
    # distillation
    distill_coef: float = 0.01  # lambda
    distill_schedule: str = "constant"  # lambda(step): constant, or decays to 0 over schedule_steps
    distill_schedule_steps: int = 0
    gate: str = "gap"
    gate_beta: float = 5.0
    entropy_gate_beta: float = 5.0
    entropy_gate_threshold: float = 1.0
    estimator: str = "sampled"
    divergence: str = "reverse_kl"  # for estimator full / topk
    topk: int = 32
    rlsd_alpha: float = 0.0  # > 0: token advantages re-weighted by the self-divergence
    # where the knobs reach beyond the loss (read by rollout and trainer)
    student_sees_skills: bool = False
    teacher_weights: str = "rollout"  # or "current"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def validate(self) -> "ObjectiveConfig":
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"objective.{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("kl_estimator", KL_ESTIMATORS)
        choice("loss_agg", LOSS_AGG_MODES)
        choice("gate", GATES)
        choice("estimator", ESTIMATORS)
        choice("divergence", DIVERGENCES)
        choice("distill_schedule", SCHEDULES)
        choice("teacher_weights", ("rollout", "current"))
        if self.estimator == "sampled" and self.divergence != "reverse_kl":
            raise ValueError(
                "objective.divergence applies to estimator 'full' or 'topk'; the sampled-token "
                f"estimator is the reverse-KL term only (got divergence={self.divergence!r})"
            )
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip range invalid: clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.distill_schedule != "constant" and self.distill_schedule_steps <= 0:
            raise ValueError("objective.distill_schedule_steps must be > 0 for a decaying schedule")
        if self.topk < 1:
            raise ValueError(f"objective.topk must be >= 1, got {self.topk}")
        for name in ("pg_coef", "kl_coef", "distill_coef", "entropy_coef", "chunk_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        return self

    def distill_coef_at(self, step: int) -> float:
        """``lambda(step)``: constant, or linear / cosine decay to 0 over ``distill_schedule_steps``."""
        if self.distill_schedule == "constant":
            return self.distill_coef
        frac = min(max(step, 0) / self.distill_schedule_steps, 1.0)
        if self.distill_schedule == "linear_decay":
            return self.distill_coef * (1.0 - frac)
        return self.distill_coef * 0.5 * (1.0 + math.cos(math.pi * frac))

    @property
    def needs_teacher(self) -> bool:
        return self.distill_coef > 0 or self.rlsd_alpha > 0


PRESETS: dict[str, dict] = {
    "grpo": dict(distill_coef=0.0),
    "opsd": dict(pg_coef=0.0, kl_coef=0.0, distill_coef=1.0, gate="none"),
    "grpo_opsd": dict(distill_coef=0.01, gate="none"),
    "sdar": dict(distill_coef=0.01, gate="gap", gate_beta=5.0),
    "skill_grpo": dict(distill_coef=0.0, student_sees_skills=True),
    "rlsd": dict(distill_coef=0.0, rlsd_alpha=0.5),
    "skill_sd": dict(distill_coef=0.05, gate="none", distill_schedule="linear_decay", distill_schedule_steps=100),
}


def preset(name: str, **overrides) -> ObjectiveConfig:
    """``ObjectiveConfig`` of a named preset with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown objective option(s) {sorted(unknown)}")
    return ObjectiveConfig(**{**PRESETS[name], **overrides}).validate()


@dataclass
class ObjectiveInputs:
    """One micro-batch as the objective sees it. ``[B, T]`` are this rank's tokens (a CP slice)."""

    student_logits: torch.Tensor  # [B, T, V_local], carries the gradient
    targets: torch.Tensor  # [B, T] global token ids of the response tokens
    mask: torch.Tensor  # [B, T] 1 for model-generated tokens
    advantages: torch.Tensor  # [B] episode advantages or [B, T] token advantages
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] trainer log-probs, rollout-time weights
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] frozen reference
    rollout_logprobs: Optional[torch.Tensor] = None  # [B, T] reported by the rollout engine
    teacher_logprobs: Optional[torch.Tensor] = None  # [B, T] teacher (privileged context)
    teacher_logits: Optional[torch.Tensor] = None  # [B, T, V_local] for estimator "full"
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [B, T, k] for estimator "topk"
    teacher_topk_ids: Optional[torch.Tensor] = None  # [B, T, k]
    action_mask: Optional[torch.Tensor] = None  # [B, T] 1 on action-choice tokens (metrics only)


@dataclass
class ParallelGroups:
    """Process groups the objective reduces over (``None``: not parallel in that dimension)."""

    tp: Optional[dist.ProcessGroup] = None  # vocabulary shards
    cp: Optional[dist.ProcessGroup] = None  # slices of the same sequences
    dp_cp: Optional[dist.ProcessGroup] = None  # every rank with different tokens


def _train_infer_diff(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                      group: Optional[dist.ProcessGroup]) -> dict[str, float]:
    """|trainer log-prob - rollout-engine log-prob| on the same tokens (mean and max over unmasked
    tokens). With the same weights on both sides this measures the resharding + numerics gap."""
    diff = (logprobs.float() - rollout_logprobs.float()).abs()
    mean, _, _ = masked_moments(diff, mask, group)
    worst = torch.where(mask > 0, diff, torch.zeros_like(diff)).max() if diff.numel() else diff.new_zeros(())
    worst = worst.reshape(1).double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return {"rollout/train_infer_logprob_diff_mean": mean, "rollout/train_infer_logprob_diff_max": float(worst)}


class SDARObjective:
    """Computes this rank's contribution to the loss of a micro-batch, and the step metrics."""

    def __init__(self, config: ObjectiveConfig, groups: Optional[ParallelGroups] = None):
        self.config = config.validate()
        self.groups = groups or ParallelGroups()

    def __call__(
        self, inputs: ObjectiveInputs, normalizers: Optional[LossNormalizers] = None, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, g = self.config, self.groups
        mask = check_mask(inputs.mask, inputs.targets)
        if normalizers is None:
            normalizers = LossNormalizers.from_mask(mask, g.dp_cp, g.cp)
        logprobs, entropy = vocab_parallel_logprobs_entropy(
            inputs.student_logits, inputs.targets, g.tp, cfg.chunk_size
        )
        old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs.detach()
        adv = inputs.advantages
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(logprobs)
        if adv.shape != logprobs.shape:
            raise ValueError(f"advantages must be [B] or [B, T]={tuple(logprobs.shape)}, got {tuple(adv.shape)}")
        adv = adv.float()

        teacher = inputs.teacher_logprobs
        if cfg.needs_teacher and teacher is None:
            raise ValueError("this objective needs teacher_logprobs (distill_coef > 0 or rlsd_alpha > 0)")
        if cfg.rlsd_alpha > 0:
            adv = self_divergence_advantages(adv, teacher.float() - logprobs.detach(), cfg.rlsd_alpha)

        total = torch.zeros((), dtype=torch.float32, device=logprobs.device)
        metrics: dict[str, float] = {}
        agg = lambda values: aggregate(values, mask, cfg.loss_agg, normalizers, g.cp)  # noqa: E731

        pg, clipped, approx_kl = ppo_clip_loss(logprobs, old, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
        if cfg.tis_cap is not None:
            if inputs.rollout_logprobs is None:
                raise ValueError("tis_cap is set but rollout_logprobs were not given")
            pg = pg * truncated_is_weights(old, inputs.rollout_logprobs, cfg.tis_cap)
        pg_loss = agg(pg)
        if cfg.pg_coef:
            total = total + cfg.pg_coef * pg_loss
        metrics["actor/pg_loss"] = float(pg_loss.detach())
        metrics["actor/pg_clipfrac"] = masked_moments(clipped, mask, g.dp_cp)[0]
        metrics["actor/ppo_kl"] = masked_moments(approx_kl, mask, g.dp_cp)[0]

        if inputs.ref_logprobs is not None:
            kl = kl_penalty(logprobs, inputs.ref_logprobs, cfg.kl_estimator)
            kl_loss = agg(kl)
            if cfg.kl_coef:
                total = total + cfg.kl_coef * kl_loss
            metrics["actor/kl_ref"] = masked_moments(kl.detach(), mask, g.dp_cp)[0]
        elif cfg.kl_coef:
            raise ValueError("kl_coef > 0 but ref_logprobs were not given")

        metrics["actor/entropy"] = masked_moments(entropy.detach(), mask, g.dp_cp)[0]
        action = inputs.action_mask.float() * mask if inputs.action_mask is not None else None
        if action is not None:  # the action-choice tokens alone (format tokens are near-deterministic)
            metrics["actor/action_entropy"] = masked_moments(entropy.detach(), action, g.dp_cp)[0]
        if inputs.rollout_logprobs is not None:
            metrics.update(_train_infer_diff(logprobs.detach(), inputs.rollout_logprobs, mask, g.dp_cp))
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * agg(entropy)

        lam = cfg.distill_coef_at(step)
        if teacher is not None and (lam > 0 or cfg.rlsd_alpha > 0):
            divergence = self._divergence(inputs) if cfg.estimator != "sampled" else None
            distill_loss, gate_metrics = gated_distillation(
                logprobs, teacher, mask, beta=cfg.gate_beta, gate=cfg.gate, loss_agg=cfg.loss_agg,
                entropy=entropy, per_token_divergence=divergence, normalizers=normalizers,
                cp_group=g.cp, metrics_group=g.dp_cp, entropy_beta=cfg.entropy_gate_beta,
                entropy_threshold=cfg.entropy_gate_threshold,
            )
            if lam > 0:
                total = total + lam * distill_loss
            metrics.update(gate_metrics)
            if action is not None:
                gap = teacher.detach().float() - logprobs.detach().float()
                gate = compute_gate(gap, cfg.gate, cfg.gate_beta, entropy, cfg.entropy_gate_beta,
                                    cfg.entropy_gate_threshold)
                metrics["sdar/action_gap_mean"] = masked_moments(gap, action, g.dp_cp)[0]
                metrics["sdar/action_gate_mean"] = masked_moments(gate, action, g.dp_cp)[0]
            metrics["sdar/distill_loss"] = float(distill_loss.detach())
            metrics["sdar/distill_coef"] = lam
        metrics["actor/loss"] = float(total.detach())
        return total, metrics

    def _divergence(self, inputs: ObjectiveInputs) -> torch.Tensor:
        cfg, tp = self.config, self.groups.tp
        if cfg.estimator == "full":
            if inputs.teacher_logits is None:
                raise ValueError("estimator 'full' needs teacher_logits")
            return vocab_parallel_divergence(
                inputs.student_logits, inputs.teacher_logits, cfg.divergence, tp, cfg.chunk_size
            )
        if inputs.teacher_topk_logprobs is None or inputs.teacher_topk_ids is None:
            raise ValueError("estimator 'topk' needs teacher_topk_logprobs and teacher_topk_ids")
        return topk_tail_divergence(
            inputs.student_logits, inputs.teacher_topk_logprobs, inputs.teacher_topk_ids,
            cfg.divergence, tp, cfg.chunk_size,
        )
