"""The SDAR objective: one config-driven loss for SDAR and every baseline the paper compares.

``L = pg_coef * agg(w_t * pg_t) + kl_coef * agg(kl_t) - entropy_coef * agg(H_t)
      + lambda(step) * agg_D(d_t)``

* ``pg_t``: PPO clipped surrogate with token advantages: the episode's group-normalized advantage,
  re-weighted per token by RLSD's clipped self-divergence weight when ``rlsd_coef > 0``
  (:func:`~megatron_sdar.algo.grpo.rlsd_token_advantages`); ``w_t`` the truncated importance
  weights when ``tis_cap`` is set (else 1);
* ``kl_t``: KL-to-reference estimator (k1/k2/k3); ``H_t`` the student's entropy;
* ``d_t``: the distillation term, ``distill_term="gated"`` (SDAR and the OPSD family,
  :func:`~megatron_sdar.algo.gates.gated_distillation`: ``g_t * (lpT_t - lpS_t)`` for the
  sampled-token estimator, ``g_t * D_t`` with an exact full-vocabulary or top-k + tail divergence)
  or ``"skill_sd"`` (Skill-SD's ``rho_t * k3_t``, :func:`~megatron_sdar.algo.gates.skill_sd_distillation`);
* ``agg``: ``token-mean`` / ``seq-mean-token-sum`` / ``seq-mean-token-mean`` with global
  normalizers (:mod:`megatron_sdar.algo.aggregation`), exact under CP and DP. The RL terms
  aggregate over the RL tokens (``mask``); ``agg_D`` over the distillation tokens
  (``distill_mask``, the same tokens except for HDPO, whose distillation covers only the tokens of
  successful rescue episodes and whose RL terms cover only the ordinary rollout).

The presets (:data:`PRESETS`) are the one place where a preset's values live; Hydra's ``algo``
group, the README's list and ``tools/compare_algos.py`` are built from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sdar.algo.aggregation import LOSS_AGG_MODES, LossNormalizers, Segments, aggregate, check_mask, masked_moments
from megatron_sdar.algo.fused_kernels import KERNELS
from megatron_sdar.algo.gates import GATES, compute_gate, gated_distillation, skill_sd_distillation
from megatron_sdar.algo.grpo import KL_ESTIMATORS, kl_penalty, ppo_clip_loss, rlsd_token_advantages, truncated_is_weights
from megatron_sdar.algo.vocab_parallel import (
    DEFAULT_CHUNK_SIZE,
    DIVERGENCES,
    topk_tail_divergence,
    vocab_parallel_divergence,
    vocab_parallel_logprobs_entropy,
)

ESTIMATORS = ("sampled", "full", "topk")
#: the teacher's weights (``ObjectiveConfig.teacher``; :class:`~megatron_sdar.trainer.teacher.TeacherWeights`)
TEACHERS = ("shared", "frozen", "ema")
SCHEDULES = ("constant", "linear_decay", "cosine_decay")
DISTILL_TERMS = ("gated", "skill_sd")


def scheduled(value: float, schedule: str, steps: int, step: int) -> float:
    """``value`` at ``step``: constant, or decaying linearly / by a half cosine to 0 at ``steps``."""
    if schedule == "constant":
        return value
    frac = min(max(step, 0) / steps, 1.0)
    if schedule == "linear_decay":
        return value * (1.0 - frac)
    return value * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class ObjectiveConfig:
    """Every knob of the objective (the Hydra ``algo`` group holds exactly these fields plus
    ``name``); the presets of :data:`PRESETS` set some of them."""

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
    # distillation: lambda(step) * agg(d_t)
    distill_coef: float = 0.01  # lambda
    distill_schedule: str = "constant"  # lambda(step): constant, or decays to 0 over schedule_steps
    distill_schedule_steps: int = 0
    distill_term: str = "gated"  # "gated" (SDAR, OPSD, HDPO) or "skill_sd" (rho * k3)
    gate: str = "gap"
    gate_beta: float = 5.0  # 0: the gate is the constant sigmoid(0) = 0.5 (grpo_opsd)
    entropy_gate_beta: float = 5.0
    entropy_gate_threshold: float = 1.0
    estimator: str = "sampled"
    divergence: str = "reverse_kl"  # for estimator full / topk
    topk: int = 32
    skill_sd_rho_cap: float = 10.0  # rho_t = exp(min(lpS - lp_old, cap))
    skill_sd_gap_cap: float = 20.0  # k3_t = exp(min(lpT - lpS, cap)) - 1 + (lpS - lpT)
    # RLSD: token advantages A * ((1 - lam) + lam * clip(exp(sign(A) * gap), 1 - clip, 1 + clip))
    rlsd_coef: float = 0.0  # lam at step 0; > 0 turns the re-weighting on
    rlsd_clip: float = 0.2  # eps_w
    rlsd_schedule: str = "linear_decay"
    rlsd_schedule_steps: int = 100
    # the teacher's weights: "shared" (the rollout-time policy, as the SDAR release), "frozen" (the
    # policy at the start of RL, the KL reference model's weights: verl's OPSD PR #6909), "ema" (an
    # exponential moving average of the policy, theta_T <- d * theta_T + (1 - d) * theta after every
    # update: NeMo-RL's OPSD PR #2063); the skills in the prompt make it a teacher in every case
    teacher: str = "shared"
    teacher_ema_decay: float = 0.9  # d; our choice for 12-step CPU runs (half-life of 6.6 updates)
    # HDPO: cliff groups (every episode failed) are played again with the skills in the prompt;
    # the distillation term covers only the successful replays, the RL terms the ordinary rollout
    cliff_rescue: bool = False
    # where the knobs reach beyond the loss (read by rollout and trainer)
    student_sees_skills: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    kernel: str = "eager"  # the vocabulary chunks' kernels: eager, compile (torch.compile) or triton

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
        choice("rlsd_schedule", SCHEDULES)
        choice("distill_term", DISTILL_TERMS)
        choice("kernel", KERNELS)
        choice("teacher", TEACHERS)
        if not 0.0 < self.teacher_ema_decay < 1.0:
            raise ValueError(f"objective.teacher_ema_decay must be in (0, 1), got {self.teacher_ema_decay}")
        if self.estimator == "sampled" and self.divergence != "reverse_kl":
            raise ValueError(
                "objective.divergence applies to estimator 'full' or 'topk'; the sampled-token "
                f"estimator is the reverse-KL term only (got divergence={self.divergence!r})"
            )
        if self.distill_term == "skill_sd" and self.estimator != "sampled":
            raise ValueError("objective.distill_term='skill_sd' is a sampled-token term (estimator must be 'sampled')")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip range invalid: clip_low={self.clip_low}, clip_high={self.clip_high}")
        for name in ("distill", "rlsd"):
            if getattr(self, f"{name}_schedule") != "constant" and getattr(self, f"{name}_schedule_steps") <= 0:
                raise ValueError(f"objective.{name}_schedule_steps must be > 0 for a decaying schedule")
        if self.topk < 1:
            raise ValueError(f"objective.topk must be >= 1, got {self.topk}")
        if not 0.0 <= self.rlsd_coef <= 1.0 or not 0.0 <= self.rlsd_clip < 1.0:
            raise ValueError(f"objective.rlsd_coef must be in [0, 1] and rlsd_clip in [0, 1), got "
                             f"{self.rlsd_coef} and {self.rlsd_clip}")
        if self.cliff_rescue and self.rlsd_coef > 0:
            raise ValueError("objective.cliff_rescue (HDPO) scores only rescue episodes with the teacher; "
                             "it cannot be combined with rlsd_coef > 0")
        if self.cliff_rescue and self.student_sees_skills:
            raise ValueError("objective.cliff_rescue (HDPO) distils skills into a student that does not see them; "
                             "student_sees_skills must be false")
        for name in ("pg_coef", "kl_coef", "distill_coef", "entropy_coef", "chunk_size", "gate_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        return self

    def distill_coef_at(self, step: int) -> float:
        """``lambda(step)``: constant, or linear / cosine decay to 0 over ``distill_schedule_steps``."""
        return scheduled(self.distill_coef, self.distill_schedule, self.distill_schedule_steps, step)

    def rlsd_coef_at(self, step: int) -> float:
        """RLSD's mixing weight ``lam(step)`` (the release: 0.5 decaying linearly to 0 over 100 steps)."""
        return scheduled(self.rlsd_coef, self.rlsd_schedule, self.rlsd_schedule_steps, step)

    @property
    def needs_teacher(self) -> bool:
        return self.distill_coef > 0 or self.rlsd_coef > 0


@dataclass(frozen=True)
class Preset:
    """A named objective: what it does differently (one line, for the README and ``--help``),
    where it comes from, and the :class:`ObjectiveConfig` fields it sets."""

    summary: str
    source: str
    values: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "grpo": Preset("GRPO alone: lambda = 0, no teacher pass.",
                   "Shao et al. 2024 (DeepSeekMath), as run by the SDAR release", dict(distill_coef=0.0)),
    "opsd": Preset("distillation only (ungated, lambda = 1), no policy-gradient or KL term.",
                   "on-policy self-distillation baseline of the SDAR paper",
                   dict(pg_coef=0.0, kl_coef=0.0, distill_coef=1.0, gate="none")),
    "grpo_opsd": Preset("GRPO + the SDAR term with beta = 0: the gate is the constant 0.5.",
                        "SDAR release (its GRPO+OPSD run is the SDAR loss with beta = 0)",
                        dict(distill_coef=0.01, gate="gap", gate_beta=0.0)),
    "sdar": Preset("GRPO + lambda * sigmoid(beta * gap)-gated sampled-token distillation (lambda 0.01, beta 5).",
                   "SDAR, arXiv 2605.15155, and its release", dict(distill_coef=0.01, gate="gap", gate_beta=5.0)),
    "sdar_full": Preset("SDAR with the exact full-vocabulary reverse KL per token instead of the sampled token.",
                        "our variant of SDAR (the paper's estimator ablation)",
                        dict(distill_coef=0.01, gate="gap", gate_beta=5.0, estimator="full")),
    "skill_grpo": Preset("GRPO with the skills in the student's own prompt, at training and at evaluation.",
                         "skill-augmented GRPO baseline of the SDAR paper",
                         dict(distill_coef=0.0, student_sees_skills=True)),
    "rlsd": Preset("GRPO with token advantages A * ((1 - lam) + lam * clip(exp(sign(A) * gap), 0.8, 1.2)), "
                   "lam 0.5 -> 0 over 100 steps; no distillation term.",
                   "RLSD as released with SDAR",
                   dict(distill_coef=0.0, rlsd_coef=0.5, rlsd_clip=0.2, rlsd_schedule="linear_decay",
                        rlsd_schedule_steps=100)),
    "skill_sd": Preset("GRPO + 0.001 * agg(rho * k3), rho = exp(min(lpS - lp_old, 10)), k3 the teacher KL.",
                       "Skill-SD as released with SDAR (its lambda schedule is logged, not applied)",
                       dict(distill_coef=0.001, distill_term="skill_sd", gate="none")),
    "hdpo": Preset("GRPO + lambda * top-64 JSD to the teacher on successful skill-prompted replays of all-fail groups.",
                   "HDPO, arXiv 2603.23871 (lambda 0.1 is our choice; the paper sweeps it)",
                   dict(distill_coef=0.1, gate="none", estimator="topk", topk=64, divergence="jsd",
                        cliff_rescue=True)),
}


def preset_fields(name: str) -> dict:
    """Every :class:`ObjectiveConfig` field of preset ``name`` (the preset's values over the defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**dataclasses.asdict(ObjectiveConfig()), **PRESETS[name].values}


def preset(name: str, **overrides) -> ObjectiveConfig:
    """``ObjectiveConfig`` of a named preset with ``overrides`` applied, validated."""
    fields = preset_fields(name)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown objective option(s) {sorted(unknown)}")
    return ObjectiveConfig(**{**fields, **overrides}).validate()


@dataclass
class ObjectiveInputs:
    """One micro-batch as the objective sees it. ``[B, T]`` are this rank's tokens (a CP slice)."""

    student_logits: torch.Tensor  # [B, T, V_local], carries the gradient
    targets: torch.Tensor  # [B, T] global token ids of the response tokens
    mask: torch.Tensor  # [B, T] 1 for the model-generated tokens of the RL terms
    advantages: torch.Tensor  # [B] episode advantages or [B, T] token advantages
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] trainer log-probs, rollout-time weights
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] frozen reference
    rollout_logprobs: Optional[torch.Tensor] = None  # [B, T] reported by the rollout engine
    teacher_logprobs: Optional[torch.Tensor] = None  # [B, T] teacher (privileged context)
    teacher_logits: Optional[torch.Tensor] = None  # [B, T, V_local] for estimator "full"
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [B, T, k] for estimator "topk"
    teacher_topk_ids: Optional[torch.Tensor] = None  # [B, T, k]
    action_mask: Optional[torch.Tensor] = None  # [B, T] 1 on action-choice tokens (metrics only)
    distill_mask: Optional[torch.Tensor] = None  # [B, T] tokens of the distillation term (None: mask)
    segments: Optional[Segments] = None  # packed rows: each token's sample (None: a row is a sequence)


@dataclass
class ParallelGroups:
    """Process groups the objective reduces over (``None``: not parallel in that dimension)."""

    tp: Optional[dist.ProcessGroup] = None  # vocabulary shards
    cp: Optional[dist.ProcessGroup] = None  # slices of the same sequences
    dp_cp: Optional[dist.ProcessGroup] = None  # every rank with different tokens


def token_rows(*masks: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the tokens any of ``masks`` selects, and at least one (so that a micro-batch
    without a selected token still gives the logits a gradient, of zeros)."""
    rows = masks[0] > 0
    for mask in masks[1:]:
        rows = rows | (mask > 0)
    if not bool(rows.any()) and rows.numel():
        rows = rows.clone()
        rows.view(-1)[0] = True
    return rows


def on_rows(rows: torch.Tensor, fn, *tensors: torch.Tensor):
    """``fn`` over the selected tokens of ``[B, T, ...]`` tensors (as ``[N, ...]``), its ``[N]``
    outputs scattered back to ``[B, T]`` with zeros elsewhere (differentiable). Exact for every
    term that reads only selected tokens; on TP ranks (same tokens) ``N`` is the same."""
    out = fn(*(t[rows] for t in tensors))
    outs = out if isinstance(out, tuple) else (out,)
    full = tuple(o.new_zeros(rows.shape).masked_scatter(rows, o) for o in outs)
    return full if isinstance(out, tuple) else full[0]


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
        self, inputs: ObjectiveInputs, normalizers: Optional[LossNormalizers] = None, step: int = 0,
        distill_normalizers: Optional[LossNormalizers] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``normalizers``: global counts of the step's RL tokens (``mask``); ``distill_normalizers``:
        of its distillation tokens (``distill_mask``; default: the same as ``normalizers``)."""
        cfg, g = self.config, self.groups
        mask = check_mask(inputs.mask, inputs.targets)
        if normalizers is None:
            normalizers = LossNormalizers.from_mask(mask, g.dp_cp, g.cp)
        if inputs.distill_mask is None:
            distill_mask, distill_normalizers = mask, distill_normalizers or normalizers
        else:
            distill_mask = check_mask(inputs.distill_mask, inputs.targets, "distill_mask")
            if distill_normalizers is None:
                distill_normalizers = LossNormalizers.from_mask(distill_mask, g.dp_cp, g.cp)
        # the vocabulary-wide work only on the tokens some term reads (prompts are most of a row)
        rows = token_rows(mask, distill_mask)
        logprobs, entropy = on_rows(
            rows, lambda z, t: vocab_parallel_logprobs_entropy(z, t, g.tp, cfg.chunk_size, cfg.kernel),
            inputs.student_logits, inputs.targets)
        old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs.detach()
        adv = inputs.advantages
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(logprobs)
        if adv.shape != logprobs.shape:
            raise ValueError(f"advantages must be [B] or [B, T]={tuple(logprobs.shape)}, got {tuple(adv.shape)}")
        adv = adv.float()

        teacher = inputs.teacher_logprobs
        if cfg.needs_teacher and teacher is None and not cfg.cliff_rescue:  # HDPO: no rescue, no teacher
            raise ValueError("this objective needs teacher_logprobs (distill_coef > 0 or rlsd_coef > 0)")
        metrics: dict[str, float] = {}
        rlsd_lam = cfg.rlsd_coef_at(step)
        if cfg.rlsd_coef > 0:
            gap = teacher.detach().float() - logprobs.detach().float()
            adv = rlsd_token_advantages(adv, gap, rlsd_lam, cfg.rlsd_clip)
            gap_mean, gap_std, _ = masked_moments(gap, mask, g.dp_cp)
            metrics.update({"rlsd/coef": rlsd_lam, "sdar/gap_mean": gap_mean, "sdar/gap_std": gap_std})

        total = torch.zeros((), dtype=torch.float32, device=logprobs.device)
        agg = lambda values: aggregate(values, mask, cfg.loss_agg, normalizers, g.cp, inputs.segments)  # noqa: E731

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
        action = inputs.action_mask.float() if inputs.action_mask is not None else None
        if action is not None:  # the action-choice tokens alone (format tokens are near-deterministic)
            metrics["actor/action_entropy"] = masked_moments(entropy.detach(), action * mask, g.dp_cp)[0]
        if inputs.rollout_logprobs is not None:
            metrics.update(_train_infer_diff(logprobs.detach(), inputs.rollout_logprobs, mask, g.dp_cp))
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * agg(entropy)

        lam = cfg.distill_coef_at(step)
        if teacher is not None and lam > 0:
            if cfg.distill_term == "skill_sd":
                distill_loss, distill_metrics = skill_sd_distillation(
                    logprobs, old, teacher, distill_mask, loss_agg=cfg.loss_agg, normalizers=distill_normalizers,
                    rho_cap=cfg.skill_sd_rho_cap, gap_cap=cfg.skill_sd_gap_cap, cp_group=g.cp,
                    metrics_group=g.dp_cp, segments=inputs.segments)
            else:
                divergence = self._divergence(inputs, rows) if cfg.estimator != "sampled" else None
                distill_loss, distill_metrics = gated_distillation(
                    logprobs, teacher, distill_mask, beta=cfg.gate_beta, gate=cfg.gate, loss_agg=cfg.loss_agg,
                    entropy=entropy, per_token_divergence=divergence, normalizers=distill_normalizers,
                    cp_group=g.cp, metrics_group=g.dp_cp, entropy_beta=cfg.entropy_gate_beta,
                    entropy_threshold=cfg.entropy_gate_threshold, segments=inputs.segments,
                )
            total = total + lam * distill_loss
            metrics.update(distill_metrics)
            metrics["sdar/distill_loss"] = float(distill_loss.detach())
            metrics["sdar/distill_coef"] = lam
        if teacher is not None and action is not None and (lam > 0 or cfg.rlsd_coef > 0):
            gap = teacher.detach().float() - logprobs.detach().float()
            on = action * (distill_mask if lam > 0 else mask)
            metrics["sdar/action_gap_mean"] = masked_moments(gap, on, g.dp_cp)[0]
            if cfg.distill_term == "gated" and lam > 0:
                gate = compute_gate(gap, cfg.gate, cfg.gate_beta, entropy, cfg.entropy_gate_beta,
                                    cfg.entropy_gate_threshold)
                metrics["sdar/action_gate_mean"] = masked_moments(gate, on, g.dp_cp)[0]
        metrics["actor/loss"] = float(total.detach())
        return total, metrics

    def _divergence(self, inputs: ObjectiveInputs, rows: torch.Tensor) -> torch.Tensor:
        cfg, tp = self.config, self.groups.tp
        if cfg.estimator == "full":
            if inputs.teacher_logits is None:
                raise ValueError("estimator 'full' needs teacher_logits")
            return on_rows(rows, lambda s, t: vocab_parallel_divergence(s, t, cfg.divergence, tp, cfg.chunk_size,
                                                                        cfg.kernel),
                           inputs.student_logits, inputs.teacher_logits)
        if inputs.teacher_topk_logprobs is None or inputs.teacher_topk_ids is None:
            raise ValueError("estimator 'topk' needs teacher_topk_logprobs and teacher_topk_ids")
        return on_rows(rows, lambda s, lp, ids: topk_tail_divergence(s, lp, ids, cfg.divergence, tp, cfg.chunk_size,
                                                                     kernel=cfg.kernel),
                       inputs.student_logits, inputs.teacher_topk_logprobs, inputs.teacher_topk_ids)
