"""Gates and the gated self-distillation term of SDAR.

Per model-generated token ``t`` (SPEC section 1):

* ``gap_t = stopgrad(lpT_t - lpS_t)``: teacher minus student log-prob of the sampled token.
* gate ``gap`` (default): ``g_t = sigmoid(beta * gap_t)``, ``beta = 5``. Near 1 where the teacher
  endorses the sampled token, softly towards 0 where it rejects it (possibly a bad skill).
* gate ``entropy``: ``g_t = sigmoid(entropy_beta * (H_t - entropy_threshold))`` with ``H_t`` the
  student's entropy (nats) at that position: distil where the student is uncertain.
* gate ``soft_or``: ``1 - (1 - g_gap)(1 - g_ent)``.
* gate ``none``: ``g_t = 1`` (the ungated, unstable ``grpo_opsd`` baseline).

All gates are detached. The distillation term (paper release, sampled-token estimator) is
``d_t = g_t * (lpT_t - lpS_t)`` whose gradient is ``-g_t * grad lpS_t``; with a full-vocabulary or
top-k estimator ``d_t = g_t * D_t`` with ``D_t`` the chosen divergence of that token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_sdar.algo.aggregation import LossNormalizers, aggregate, check_mask, masked_moments

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
    if student_logprobs.dim() != 2:
        raise ValueError(f"student_logprobs must be [B, T], got shape {tuple(student_logprobs.shape)}")
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)}, expected "
            f"{tuple(student_logprobs.shape)}"
        )
    m = check_mask(mask, student_logprobs)
    if normalizers is None:
        normalizers = LossNormalizers.from_mask(m)
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
    loss = aggregate(per_token, m, loss_agg, normalizers, cp_group)

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
