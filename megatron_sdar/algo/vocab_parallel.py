"""Vocabulary-parallel log-probabilities, entropy and student-teacher divergences.

Megatron's output layer leaves logits sharded over the vocabulary across the TP group: every rank
holds ``[..., V / tp]`` columns, rank ``r`` owning global ids ``[r * V/tp, (r + 1) * V/tp)``.
Nothing here gathers the vocabulary: per-token statistics (max, sum-exp, target logit, expected
logit) are reduced over the TP group, and every full-vocabulary temporary is bounded by a chunk of
tokens (``chunk_size`` rows of ``V/tp`` fp32 values). Backward keeps only the input logits and a
few per-token fp32 statistics, and recomputes the probabilities chunk by chunk.

TP convention (as Megatron's ``vocab_parallel_cross_entropy``): every TP rank returns the same
per-token values, and the gradient a rank receives for its logits shard is the gradient of the
one loss (not summed over TP ranks). The loss computed from these outputs must therefore be the
same on every TP rank, which it is when it is a function of these outputs only.

Formulas (``z`` logits of one token, ``logZ = log sum_j exp z_j``, ``p = softmax(z)``):

* log-prob of target ``y``: ``z_y - logZ``; gradient ``onehot(y) - p``.
* entropy ``H = logZ - sum_j p_j z_j``; gradient ``-p_k (log p_k + H)``.
* reverse KL ``KL(S || T) = sum_j pS_j (log pS_j - log pT_j)``; gradient w.r.t. the student
  logits ``pS_k (log pS_k - log pT_k - KL)``.
* forward KL ``KL(T || S) = sum_j pT_j (log pT_j - log pS_j)``; gradient ``pS_k - pT_k``.
* Jensen-Shannon ``JSD = 1/2 KL(S || M) + 1/2 KL(T || M)``, ``M = (pS + pT) / 2``; gradient
  ``pS_k (a_k - sum_j pS_j a_j)`` with ``a_j = 1/2 (log pS_j - log M_j)``.

The teacher never receives a gradient.

``kernel`` (the objective's ``algo.kernel``): the per-chunk kernels, ``eager`` (the torch ops here),
``compile`` or ``triton`` (:mod:`megatron_sdar.algo.fused_kernels`; JSD is always eager).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sdar.algo import fused_kernels as fused

DEFAULT_CHUNK_SIZE = 128  # tokens; 128 x 151,936 fp32 = 78 MB per workspace buffer
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


# ----------------------------------------------------------------------------- TP helpers
def _tp_world_and_rank(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def _vocab_range(v_local: int, tp_group) -> tuple[int, int]:
    world, rank = _tp_world_and_rank(tp_group)
    return rank * v_local, (rank + 1) * v_local


def _log_normalizer(z: torch.Tensor, tp_group) -> torch.Tensor:
    """``log sum exp`` of fp32 logits chunk ``z [n, V_local]`` over the global vocabulary -> ``[n]``."""
    zmax = z.max(dim=-1).values
    _all_reduce(zmax, dist.ReduceOp.MAX, tp_group)
    sumexp = torch.exp(z - zmax[:, None]).sum(dim=-1)
    _all_reduce(sumexp, dist.ReduceOp.SUM, tp_group)
    return zmax + torch.log(sumexp)


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p * x`` with ``0 * (+-inf) = 0`` (a logit of -inf is a valid, impossible token)."""
    return torch.where(p > 0, p * x, torch.zeros((), dtype=x.dtype, device=x.device))


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape [..., V_local], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32 or bf16), got {logits.dtype}")


# ------------------------------------------------------------------ log-probs and entropy
class _Workspace:
    """Two reusable fp32 ``[chunk, V_local]`` buffers: every chunk computes in place in them.

    Fresh large allocations cost a page fault per page on CPU and allocator traffic on GPU; the
    chunk loops below allocate only per-token vectors.
    """

    def __init__(self, rows: int, cols: int, device):
        self.a = torch.empty(rows, cols, dtype=torch.float32, device=device)
        self.b = torch.empty(rows, cols, dtype=torch.float32, device=device)

    def views(self, rows: int):
        return self.a[:rows], self.b[:rows]


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_j x_ij y_ij`` per row without a ``[n, V]`` temporary (a batched matrix-vector dot)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _shifted_exp_stats(z, tp_group, shifted, expd):
    """Global ``(max, sum e, sum e * (z - max))`` of a chunk; ``e = exp(z - max)`` left in ``expd``.

    ``sum e * (z - max)`` is the numerator of the expected logit. A ``-inf`` logit (an impossible
    token) makes the plain dot ``0 * -inf = nan``: such rows are recomputed with ``xlogy``.
    """
    zmax = z.amax(dim=-1)
    _all_reduce(zmax, dist.ReduceOp.MAX, tp_group)
    torch.sub(z, zmax[:, None], out=shifted)
    torch.exp(shifted, out=expd)
    sums = torch.stack([expd.sum(-1), _row_dot(expd, shifted)], dim=-1)
    bad = ~torch.isfinite(sums[:, 1])
    has_inf = bool(bad.any())
    if has_inf:
        sums[bad, 1] = torch.special.xlogy(expd[bad], expd[bad]).sum(-1)
    return zmax, sums, has_inf


class _VocabParallelLogProbs(torch.autograd.Function):
    """Gathered log-probs ``[n, k]`` at global ids ``indices [n, k]`` plus entropy ``[n]``."""

    @staticmethod
    def forward(ctx, logits, indices, tp_group, chunk_size, kernel):
        n, v_local = logits.shape
        vocab_start, vocab_end = _vocab_range(v_local, tp_group)
        logprobs = torch.empty(indices.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
        log_norm = torch.empty(n, dtype=torch.float32, device=logits.device)
        use_fused = kernel != "eager"
        work = None if use_fused else _Workspace(min(chunk_size, n), v_local, logits.device)
        has_inf = False
        for s, e in _chunks(n, chunk_size):
            z = logits[s:e].float()
            if use_fused:
                local_max, local_sum, local_lin = fused.lse_stats(kernel, z)
                zmax = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
                sums = torch.stack(fused.rescale_to_global_max(local_max, zmax, local_sum, local_lin), -1)
            else:
                shifted, expd = work.views(e - s)
                zmax, sums, chunk_has_inf = _shifted_exp_stats(z, tp_group, shifted, expd)
                has_inf |= chunk_has_inf
            idx = indices[s:e]
            local = (idx >= vocab_start) & (idx < vocab_end)
            picked = z.gather(-1, (idx - vocab_start).clamp(0, v_local - 1)) * local
            stats = torch.cat([sums, picked], dim=-1)
            _all_reduce(stats, dist.ReduceOp.SUM, tp_group)  # one collective for all statistics
            lz = zmax + torch.log(stats[:, 0])
            logprobs[s:e] = stats[:, 2:] - lz[:, None]
            # H = logZ - E[z] = log S - sum e (z - max) / S
            entropy[s:e] = torch.log(stats[:, 0]) - stats[:, 1] / stats[:, 0]
            log_norm[s:e] = lz
        ctx.save_for_backward(logits, indices, log_norm, entropy)
        ctx.tp_group, ctx.chunk_size, ctx.has_inf, ctx.kernel = tp_group, chunk_size, has_inf, kernel
        ctx.mark_non_differentiable(indices)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, indices, log_norm, entropy = ctx.saved_tensors
        n, v_local = logits.shape
        vocab_start, vocab_end = _vocab_range(v_local, ctx.tp_group)
        grad_logits = torch.empty_like(logits)
        use_fused = ctx.kernel != "eager"
        work = None if use_fused else _Workspace(min(ctx.chunk_size, n), v_local, logits.device)
        for s, e in _chunks(n, ctx.chunk_size):
            glp = (grad_logprobs[s:e].float() if grad_logprobs is not None
                   else torch.zeros(e - s, indices.shape[1], device=logits.device))
            if use_fused:
                g_h = (grad_entropy[s:e].float() if grad_entropy is not None
                       else torch.zeros(e - s, device=logits.device))
                g = grad_logits[s:e]  # written in place by the compiled kernel
                fused.logprob_entropy_grad(ctx.kernel, g, logits[s:e].float(), log_norm[s:e],
                                           glp.sum(-1) + g_h * entropy[s:e], g_h)
                local = (indices[s:e] >= vocab_start) & (indices[s:e] < vocab_end)
                g.scatter_add_(-1, (indices[s:e] - vocab_start).clamp(0, v_local - 1),
                               (glp * local).to(g.dtype))
                continue
            log_p, g = work.views(e - s)
            if logits.dtype == torch.float32:
                g = grad_logits[s:e]  # compute the gradient in place, no copy
            torch.sub(logits[s:e].float(), log_norm[s:e, None], out=log_p)
            torch.exp(log_p, out=g)  # p
            # d/dz_k of (sum_i glp_i lp_i + gH H) = onehot - p_k (sum glp + gH (log p_k + H))
            if grad_entropy is not None:
                g_h = grad_entropy[s:e, None].float()
                log_p.mul_(g_h).add_(glp.sum(-1, keepdim=True) + g_h * entropy[s:e, None])
                g.mul_(log_p).neg_()
                if ctx.has_inf:
                    g.nan_to_num_(nan=0.0)  # p = 0 at a -inf logit: its gradient is 0
            else:
                g.mul_(-glp.sum(-1, keepdim=True))
            local = (indices[s:e] >= vocab_start) & (indices[s:e] < vocab_end)
            g.scatter_add_(-1, (indices[s:e] - vocab_start).clamp(0, v_local - 1), glp * local)
            if g.data_ptr() != grad_logits[s:e].data_ptr():
                grad_logits[s:e] = g
        return grad_logits, None, None, None, None


def _flatten_logits(logits: torch.Tensor, index: torch.Tensor, index_name: str):
    """``[..., V_local]`` logits and ``[..., k]`` ids -> ``[n, V_local]``, ``[n, k]``; validated."""
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"{index_name} has shape {tuple(index.shape)}; expected leading dims "
            f"{tuple(logits.shape[:-1])} to match logits {tuple(logits.shape)}"
        )
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{index_name} must hold integer token ids, got {index.dtype}")
    return logits.reshape(-1, logits.shape[-1]), index.reshape(-1, index.shape[-1]).long()


def _check_ids_in_vocab(ids: torch.Tensor, v_local: int, tp_group, name: str) -> None:
    world, _ = _tp_world_and_rank(tp_group)
    vocab = v_local * world
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} holds ids outside [0, {vocab}) (vocabulary = {v_local} per rank x {world} TP ranks): "
            f"min {int(ids.min())}, max {int(ids.max())}"
        )


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kernel: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and the entropy, from vocabulary-sharded logits.

    Args:
        logits: ``[..., V_local]`` fp32 or bf16 logits of this TP rank's vocabulary shard.
        targets: ``[...]`` global token ids.
        tp_group: the tensor-parallel group the vocabulary is sharded over (None: not sharded).
        chunk_size: tokens per chunk; bounds every fp32 temporary to ``chunk_size x V_local``.
        kernel: the per-chunk kernels, ``eager``, ``compile`` or ``triton``.

    Returns:
        ``(logprobs, entropy)``, both ``[...]`` fp32, identical on every TP rank.
    """
    _check_logits("logits", logits)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor of token ids, got {type(targets).__name__}")
    flat_logits, flat_targets = _flatten_logits(logits, targets.unsqueeze(-1), "targets")
    _check_ids_in_vocab(flat_targets, logits.shape[-1], tp_group, "targets")
    logprobs, entropy = _VocabParallelLogProbs.apply(flat_logits, flat_targets, tp_group, chunk_size,
                                                     fused.check_kernel(kernel))
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


def vocab_parallel_gather_logprobs(
    logits: torch.Tensor,
    indices: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kernel: str = "eager",
) -> torch.Tensor:
    """Log-probs ``[..., k]`` at global ids ``indices [..., k]`` (e.g. a teacher's top-k)."""
    _check_logits("logits", logits)
    flat_logits, flat_idx = _flatten_logits(logits, indices, "indices")
    _check_ids_in_vocab(flat_idx, logits.shape[-1], tp_group, "indices")
    logprobs, _ = _VocabParallelLogProbs.apply(flat_logits, flat_idx, tp_group, chunk_size, fused.check_kernel(kernel))
    return logprobs.reshape(indices.shape)


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor, k: int, tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probs and global ids ``([..., k], [..., k])`` from sharded logits.

    Each rank proposes its local top-k; the ``k x tp`` candidates per token are all-gathered (a
    few numbers per token, never the vocabulary) and reduced to the global top-k.
    """
    _check_logits("logits", logits)
    world, rank = _tp_world_and_rank(tp_group)
    v_local = logits.shape[-1]
    if not 0 < k <= v_local:
        raise ValueError(f"k must be in [1, V_local={v_local}], got {k}")
    flat = logits.reshape(-1, v_local)
    out_lp = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    out_ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    for s, e in _chunks(flat.shape[0], chunk_size):
        z = flat[s:e].float()
        lz = _log_normalizer(z, tp_group)
        vals, ids = z.topk(k, dim=-1)
        vals, ids = vals - lz[:, None], ids + rank * v_local
        if world > 1:
            gathered_vals = [torch.empty_like(vals) for _ in range(world)]
            gathered_ids = [torch.empty_like(ids) for _ in range(world)]
            dist.all_gather(gathered_vals, vals.contiguous(), group=tp_group)
            dist.all_gather(gathered_ids, ids.contiguous(), group=tp_group)
            vals, ids = torch.cat(gathered_vals, -1), torch.cat(gathered_ids, -1)
            vals, pos = vals.topk(k, dim=-1)
            ids = ids.gather(-1, pos)
        out_lp[s:e], out_ids[s:e] = vals, ids
    return out_lp.reshape(*logits.shape[:-1], k), out_ids.reshape(*logits.shape[:-1], k)


# ------------------------------------------------------------- full-vocabulary divergences
class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token divergence ``[n]`` between student and teacher sharded logits ``[n, V_local]``.

    KL terms are computed from shifted logits without materializing log-softmax tensors:
    ``KL(S || T) = sum_j eS_j (zS_j - zT_j) / S_S - (lzS - lzT)`` with ``eS = exp(zS - max)``,
    ``S_S = sum eS`` (and symmetrically for the forward KL).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, kind, tp_group, chunk_size, kernel):
        n, v_local = student_logits.shape
        div = torch.empty(n, dtype=torch.float32, device=student_logits.device)
        norms = torch.empty(n, 2, dtype=torch.float32, device=student_logits.device)
        use_fused = kernel != "eager" and kind != "jsd"
        work = None if use_fused else _Workspace(min(chunk_size, n), v_local, student_logits.device)
        has_inf = False
        for s, e in _chunks(n, chunk_size):
            zs, zt = student_logits[s:e].float(), teacher_logits[s:e].float()
            if use_fused:
                z_out, z_in = (zs, zt) if kind == "reverse_kl" else (zt, zs)
                m_out, sum_out, m_in, sum_in, d = fused.kl_stats(kernel, z_out, z_in)
                maxes = _all_reduce(torch.stack([m_out, m_in]), dist.ReduceOp.MAX, tp_group)
                scale_out = torch.exp(m_out - maxes[0])
                sums = torch.stack([fused.rescale_to_global_max(m_out, maxes[0], sum_out),
                                    fused.rescale_to_global_max(m_in, maxes[1], sum_in),
                                    torch.where(sum_out > 0, d * scale_out, torch.zeros_like(d))])
                _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
                lz_out, lz_in = maxes[0] + torch.log(sums[0]), maxes[1] + torch.log(sums[1])
                div[s:e] = sums[2] / sums[0] - (lz_out - lz_in)
                lzs, lzt = (lz_out, lz_in) if kind == "reverse_kl" else (lz_in, lz_out)
                norms[s:e, 0], norms[s:e, 1] = lzs, lzt
                continue
            if kind == "jsd":
                lzs, lzt = _log_normalizer(zs, tp_group), _log_normalizer(zt, tp_group)
                log_ps, log_pt = zs - lzs[:, None], zt - lzt[:, None]
                ps, pt = torch.exp(log_ps), torch.exp(log_pt)
                log_m = torch.logaddexp(log_ps, log_pt) - math.log(2.0)
                local = 0.5 * (_p_times(ps, log_ps - log_m) + _p_times(pt, log_pt - log_m)).sum(-1)
            else:
                # e = exp(z - max) of both, then the outer distribution's e weights the log-ratio
                e_s, e_t = work.views(e - s)
                max_s, max_t = zs.amax(-1), zt.amax(-1)
                maxes = torch.stack([max_s, max_t])
                _all_reduce(maxes, dist.ReduceOp.MAX, tp_group)
                torch.sub(zs, maxes[0][:, None], out=e_s).exp_()
                torch.sub(zt, maxes[1][:, None], out=e_t).exp_()
                sums = _all_reduce(torch.stack([e_s.sum(-1), e_t.sum(-1)]), dist.ReduceOp.SUM, tp_group)
                lzs, lzt = maxes[0] + torch.log(sums[0]), maxes[1] + torch.log(sums[1])
                p, total = (e_s, sums[0]) if kind == "reverse_kl" else (e_t, sums[1])
                diff = e_t if kind == "reverse_kl" else e_s  # reuse the other buffer
                if kind == "reverse_kl":
                    torch.sub(zs, zt, out=diff)
                else:
                    torch.sub(zt, zs, out=diff)
                local = _row_dot(p, diff)
                bad = ~torch.isfinite(local)
                if bool(bad.any()):
                    has_inf = True
                    local[bad] = _p_times(p[bad], diff[bad]).sum(-1)
                local = local / total
            div[s:e] = _all_reduce(local, dist.ReduceOp.SUM, tp_group)
            if kind == "reverse_kl":
                div[s:e] -= lzs - lzt
            elif kind == "forward_kl":
                div[s:e] -= lzt - lzs
            norms[s:e, 0], norms[s:e, 1] = lzs, lzt
        ctx.save_for_backward(student_logits, teacher_logits, norms, div)
        ctx.kind, ctx.tp_group, ctx.chunk_size, ctx.has_inf, ctx.kernel = kind, tp_group, chunk_size, has_inf, kernel
        return div

    @staticmethod
    def backward(ctx, grad_div):
        student_logits, teacher_logits, norms, div = ctx.saved_tensors
        n, v_local = student_logits.shape
        grad_student = torch.empty_like(student_logits)
        use_fused = ctx.kernel != "eager" and ctx.kind != "jsd"
        work = None if use_fused else _Workspace(min(ctx.chunk_size, n), v_local, student_logits.device)
        for s, e in _chunks(n, ctx.chunk_size):
            zs, zt = student_logits[s:e].float(), teacher_logits[s:e].float()
            if use_fused:
                # the compiled kernel writes the gradient chunk in place (cast included)
                if ctx.kind == "reverse_kl":
                    offset = norms[s:e, 0] - norms[s:e, 1] + div[s:e]
                    fused.reverse_kl_grad(ctx.kernel, grad_student[s:e], zs, zt, norms[s:e, 0],
                                          offset, grad_div[s:e].float())
                else:
                    fused.forward_kl_grad(ctx.kernel, grad_student[s:e], zs, zt, norms[s:e, 0],
                                          norms[s:e, 1], grad_div[s:e].float())
                continue
            gd = grad_div[s:e, None].float()
            a, b = work.views(e - s)
            if student_logits.dtype == torch.float32:
                b = grad_student[s:e]  # compute the gradient in place, no copy
            if ctx.kind == "reverse_kl":
                # pS_k (log pS_k - log pT_k - KL) = pS_k ((zS - zT)_k - (lzS - lzT) - KL)
                torch.sub(zs, zt, out=a)
                a.sub_((norms[s:e, 0] - norms[s:e, 1] + div[s:e])[:, None])
                torch.sub(zs, norms[s:e, 0:1], out=b)
                b.exp_().mul_(a).mul_(gd)
                if ctx.has_inf:
                    b.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                g = b
            elif ctx.kind == "forward_kl":
                torch.sub(zt, norms[s:e, 1:2], out=a)
                torch.sub(zs, norms[s:e, 0:1], out=b)
                g = b.exp_().sub_(a.exp_()).mul_(gd)
            else:
                log_ps = zs - norms[s:e, 0:1]
                log_pt = zt - norms[s:e, 1:2]
                ps = torch.exp(log_ps)
                a_js = 0.5 * (log_ps - (torch.logaddexp(log_ps, log_pt) - math.log(2.0)))
                mean_a = _all_reduce(_p_times(ps, a_js).sum(-1, keepdim=True), dist.ReduceOp.SUM, ctx.tp_group)
                g = _p_times(ps, a_js - mean_a) * gd
            if g.data_ptr() != grad_student[s:e].data_ptr():
                grad_student[s:e] = g
        return grad_student, None, None, None, None, None


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "reverse_kl",
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kernel: str = "eager",
) -> torch.Tensor:
    """Exact full-vocabulary divergence per token, both inputs vocabulary-sharded ``[..., V_local]``.

    ``kind``: ``reverse_kl`` = KL(student || teacher) (default), ``forward_kl`` =
    KL(teacher || student), ``jsd`` (equal weights); formulas in the module docstring. Gradient
    flows to ``student_logits`` only. Returns ``[...]`` fp32, identical on every TP rank.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    v_local = student_logits.shape[-1]
    div = _VocabParallelDivergence.apply(
        student_logits.reshape(-1, v_local), teacher_logits.detach().reshape(-1, v_local),
        kind, tp_group, chunk_size, fused.check_kernel(kernel),
    )
    return div.reshape(student_logits.shape[:-1])


def topk_tail_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    kind: str = "reverse_kl",
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = 1e-6,
    kernel: str = "eager",
) -> torch.Tensor:
    """Divergence over the teacher's top-k tokens plus one tail bucket, per token ``[...]``.

    The teacher is represented by its top-k log-probs and global ids ``[..., k]`` (what a
    pipeline-parallel teacher pass can afford to keep). Both distributions are collapsed onto
    ``k + 1`` categories: the k ids and a tail holding the remaining mass,
    ``log tail = log(1 - sum_k p_k)`` (clamped at ``eps`` for stability); the divergence of
    ``kind`` is then taken over those categories. Exact (equal to the full-vocabulary divergence)
    when the tail masses vanish; always a lower bound of it (data-processing inequality).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs shape {tuple(teacher_topk_logprobs.shape)} != teacher_topk_ids "
            f"shape {tuple(teacher_topk_ids.shape)}"
        )
    student_lp = vocab_parallel_gather_logprobs(student_logits, teacher_topk_ids, tp_group, chunk_size, kernel)
    teacher_lp = teacher_topk_logprobs.detach().float()

    def with_tail(lp):
        tail_mass = (1.0 - torch.exp(lp).sum(-1, keepdim=True)).clamp_min(eps)
        return torch.cat([lp, torch.log(tail_mass)], dim=-1)

    log_ps, log_pt = with_tail(student_lp), with_tail(teacher_lp)
    ps, pt = torch.exp(log_ps), torch.exp(log_pt)
    if kind == "reverse_kl":
        return (ps * (log_ps - log_pt)).sum(-1)
    if kind == "forward_kl":
        return (pt * (log_pt - log_ps)).sum(-1)
    log_m = torch.logaddexp(log_ps, log_pt) - math.log(2.0)
    return 0.5 * (ps * (log_ps - log_m) + pt * (log_pt - log_m)).sum(-1)
