"""Gates and the gated self-distillation term of SDAR.

Per model-generated token ``t`` (SPEC section 1):

* ``gap_t = stopgrad(lpT_t - lpS_t)``: teacher minus student log-prob of the sampled token.
* gate ``gap`` (default): ``g_t = sigmoid(beta * gap_t)``, ``beta = 5``. Near 1 where the teacher
  endorses the sampled token, softly towards 0 where it rejects it (possibly a bad skill).
* gate ``entropy``: ``g_t = sigmoid(entropy_beta * (H_t - entropy_threshold))`` with ``H_t`` the
  student's entropy (nats) at that position: distil where the student is uncertain.
* gate ``soft_or``: ``1 - (1 - g_gap)(1 - g_ent)``.
* gate ``none``: ``g_t = 1`` (ungated: ``opsd``, ``hdpo``). The ``grpo_opsd`` baseline is the
  ``gap`` gate with ``beta = 0``, a constant ``g_t = 0.5``, as the SDAR release runs it.

All gates are detached. The distillation term (paper release, sampled-token estimator) is
``d_t = g_t * (lpT_t - lpS_t)`` whose gradient is ``-g_t * grad lpS_t``; with a full-vocabulary or
top-k estimator ``d_t = g_t * D_t`` with ``D_t`` the chosen divergence of that token.

Skill-SD's term (:func:`skill_sd_distillation`) is not gated: ``rho_t * k3_t``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_sdar.algo.aggregation import LossNormalizers, Segments, aggregate, check_mask, masked_moments

GATES = ("gap", "entropy", "soft_or", "none")


def compute_gate(
    gap: torch.Tensor,
    gate: str = "gap",
    beta: float = 5.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_beta: float = 5.0,
    entropy_threshold: float = 1.0,
) -> torch.Tensor:
    """Detached gate ``[B, T]`` from the (detached) gap and, for entropy gates, the entropy."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    gap = gap.detach().float()
    if gate == "none":
        return torch.ones_like(gap)
    g_gap = torch.sigmoid(beta * gap)
    if gate == "gap":
        return g_gap
    if entropy is None:
        raise ValueError(f"gate={gate!r} needs the student entropy (pass entropy=)")
    if entropy.shape != gap.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {tuple(gap.shape)}")
    g_ent = torch.sigmoid(entropy_beta * (entropy.detach().float() - entropy_threshold))
    if gate == "entropy":
        return g_ent
    return 1.0 - (1.0 - g_gap) * (1.0 - g_ent)


def _check_inputs(student_logprobs: torch.Tensor, mask: torch.Tensor, normalizers: Optional[LossNormalizers],
                  **others: torch.Tensor) -> tuple[torch.Tensor, LossNormalizers]:
    """The float mask and the normalizers (default: this batch alone) of a distillation term, after
    checking that ``student_logprobs`` is ``[B, T]`` and every tensor in ``others`` has its shape."""
    if student_logprobs.dim() != 2:
        raise ValueError(f"student_logprobs must be [B, T], got shape {tuple(student_logprobs.shape)}")
    for name, tensor in others.items():
        if tensor.shape != student_logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(student_logprobs.shape)}")
    m = check_mask(mask, student_logprobs)
    return m, normalizers if normalizers is not None else LossNormalizers.from_mask(m)


def gated_distillation(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 5.0,
    gate: str = "gap",
    loss_agg: str = "token-mean",
    entropy: Optional[torch.Tensor] = None,
    per_token_divergence: Optional[torch.Tensor] = None,
    normalizers: Optional[LossNormalizers] = None,
    cp_group: Optional[dist.ProcessGroup] = None,
    metrics_group: Optional[dist.ProcessGroup] = None,
    entropy_beta: float = 5.0,
    entropy_threshold: float = 1.0,
    segments: Optional[Segments] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The gated distillation loss (this rank's contribution) and the gate metrics.

    Args:
        student_logprobs: ``[B, T]`` ``lpS`` of the sampled tokens (carries the gradient).
        teacher_logprobs: ``[B, T]`` ``lpT`` of the same tokens given the privileged context.
        mask: ``[B, T]`` 1 for model-generated tokens, 0 elsewhere.
        per_token_divergence: ``[B, T]`` full-vocabulary / top-k divergence ``D_t``; when given,
            ``d_t = g_t * D_t`` replaces the sampled-token term.
        normalizers: global token/sequence counts (default: this batch alone, no CP/DP).
        metrics_group: group over which metrics are reduced (DP x CP), ``None`` for local.

    Metrics (over unmasked tokens): ``sdar/gate_mean``, ``sdar/gate_active_ratio`` (``g > 0.5``),
    ``sdar/gap_mean``, ``sdar/gap_std``.
    """
    m, normalizers = _check_inputs(student_logprobs, mask, normalizers, teacher_logprobs=teacher_logprobs)
    teacher_logprobs = teacher_logprobs.detach().float()
    gap = teacher_logprobs - student_logprobs.detach().float()
    g = compute_gate(gap, gate, beta, entropy, entropy_beta, entropy_threshold)
    if per_token_divergence is None:
        per_token = g * (teacher_logprobs - student_logprobs.float())
    else:
        if per_token_divergence.shape != student_logprobs.shape:
            raise ValueError(
                f"per_token_divergence has shape {tuple(per_token_divergence.shape)}, expected "
                f"{tuple(student_logprobs.shape)}"
            )
        per_token = g * per_token_divergence.float()
    loss = aggregate(per_token, m, loss_agg, normalizers, cp_group, segments)

    gate_mean, _, _ = masked_moments(g, m, metrics_group)
    active, _, _ = masked_moments((g > 0.5).float(), m, metrics_group)
    gap_mean, gap_std, _ = masked_moments(gap, m, metrics_group)
    metrics = {
        "sdar/gate_mean": gate_mean,
        "sdar/gate_active_ratio": active,
        "sdar/gap_mean": gap_mean,
        "sdar/gap_std": gap_std,
    }
    return loss, metrics


def skill_sd_distillation(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
    normalizers: Optional[LossNormalizers] = None,
    rho_cap: float = 10.0,
    gap_cap: float = 20.0,
    cp_group: Optional[dist.ProcessGroup] = None,
    metrics_group: Optional[dist.ProcessGroup] = None,
    segments: Optional[Segments] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Skill-SD's distillation loss ``agg(rho_t * k3_t)`` (this rank's contribution) and its metrics.

    Source: Skill-SD as released with the SDAR paper's code (arXiv 2605.15155), added to the GRPO
    loss with the fixed weight 0.001:

    * ``rho_t = exp(min(lpS_t - lp_old_t, rho_cap))``: the importance ratio, the gradient flows
      through ``lpS``;
    * ``k3_t = exp(min(lpT_t - lpS_t, gap_cap)) - 1 + (lpS_t - lpT_t)``: Schulman's k3 estimate of
      ``KL(student || teacher)`` from the sampled token, gradient through ``lpS`` as well.

    All inputs ``[B, T]``; ``lp_old`` and ``lpT`` are detached. Metrics: ``sdar/gap_mean``,
    ``sdar/gap_std`` (``lpT - lpS``) and ``skill_sd/rho_mean`` over unmasked tokens.
    """
    m, normalizers = _check_inputs(student_logprobs, mask, normalizers, teacher_logprobs=teacher_logprobs,
                                   old_logprobs=old_logprobs)
    lp = student_logprobs.float()
    teacher = teacher_logprobs.detach().float()
    rho = torch.exp((lp - old_logprobs.detach().float()).clamp(max=rho_cap))
    k3 = torch.exp((teacher - lp).clamp(max=gap_cap)) - 1.0 + (lp - teacher)
    loss = aggregate(rho * k3, m, loss_agg, normalizers, cp_group, segments)
    gap_mean, gap_std, _ = masked_moments(teacher - lp.detach(), m, metrics_group)
    rho_mean, _, _ = masked_moments(rho.detach(), m, metrics_group)
    return loss, {"sdar/gap_mean": gap_mean, "sdar/gap_std": gap_std, "skill_sd/rho_mean": rho_mean}
