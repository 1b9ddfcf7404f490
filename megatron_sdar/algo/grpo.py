"""GRPO pieces: group-normalized advantages, the PPO clipped surrogate, KL-to-reference estimators
and truncated importance sampling. Per-token tensors are ``[B, T]``; all pure tensor math."""
from __future__ import annotations

from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Episode advantages ``A = (R - mean_group(R)) / (std_group(R) + eps)`` ``[B]``.

    ``std`` is the unbiased sample std of the group (as GRPO's release); a group of one episode
    gets ``A = 0``. With ``norm_by_std=False``: ``A = R - mean_group(R)`` (Dr. GRPO).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must be [B] of equal shape, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    rewards = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64, device=rewards.device).index_add_(0, inverse, rewards)
    means = sums / counts
    centered = rewards - means[inverse]
    if not norm_by_std:
        return centered.float()
    sq = torch.zeros_like(sums).index_add_(0, inverse, centered * centered)
    std = torch.sqrt(sq / (counts - 1).clamp_min(1))
    denom = std[inverse] + eps
    # a group of one, or of identical rewards, carries no signal (and must not give 0/0)
    valid = (counts[inverse] > 1) & (denom > 0)
    adv = centered / torch.where(valid, denom, torch.ones_like(denom))
    return torch.where(valid, adv, torch.zeros_like(adv)).float()


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token.

    ``r = exp(lp - lp_old)``; ``loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``
    (``clip_high > clip_low`` is DAPO's clip-higher). With ``dual_clip = c > 1`` the loss of
    tokens with ``A < 0`` is further capped at ``-A c``.

    Returns ``(loss, clipped, approx_kl)`` ``[B, T]``: ``clipped`` is 1 where the clipped branch
    was taken, ``approx_kl = lp_old - lp``.
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = (clipped_loss > unclipped).float()
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped.detach(), (-log_ratio).detach()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)`` from sampled-token log-probs.

    With ``log r = lp_ref - lp``: ``k1 = -log r``; ``k2 = (log r)^2 / 2``;
    ``k3 = exp(log r) - log r - 1`` (Schulman's low-variance, non-negative estimator; ``log r``
    clamped to [-20, 20] so a very unlikely token cannot overflow).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_r = (ref_logprobs.detach() - logprobs).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return torch.exp(log_r) - log_r - 1.0


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(lp_old - lp_rollout), cap)`` (detached).

    Corrects for the rollout engine sampling from a slightly different distribution than the
    trainer computes (kernels, precision): ``lp_old`` is the trainer's log-prob under the
    rollout-time weights, ``lp_rollout`` what the engine reported.
    """
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    return torch.exp((old_logprobs - rollout_logprobs).detach().clamp(max=20.0)).clamp(max=cap)


def rlsd_weights(advantages: torch.Tensor, gap: torch.Tensor, clip: float) -> torch.Tensor:
    """RLSD's token weights ``w_t = clip(exp(sign(A) * gap_t), 1 - clip, 1 + clip)`` (detached).

    Source: RLSD as released with the SDAR paper's code (arXiv 2605.15155), ``eps_w = clip = 0.2``.
    ``gap_t = lpT_t - lpS_t``: where the teacher endorses a token of a successful episode (or rejects
    one of a failed episode) the token gets more of the episode's advantage, at most ``1 + clip``.
    """
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"rlsd clip must be in [0, 1), got {clip}")
    log_w = (torch.sign(advantages) * gap.detach()).clamp(-20.0, 20.0)
    return torch.exp(log_w).clamp(1.0 - clip, 1.0 + clip).detach()


def rlsd_token_advantages(advantages: torch.Tensor, gap: torch.Tensor, lam: float, clip: float = 0.2) -> torch.Tensor:
    """RLSD token advantages ``A_t = A * ((1 - lam) + lam * w_t)`` with :func:`rlsd_weights` (detached).

    Source: RLSD as released with SDAR; ``lam`` decays linearly from 0.5 to 0 over 100 steps there
    (:meth:`ObjectiveConfig.rlsd_coef_at`). ``advantages``, ``gap``: ``[B, T]``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"rlsd lam must be in [0, 1], got {lam}")
    return (advantages * ((1.0 - lam) + lam * rlsd_weights(advantages, gap, clip))).detach()
