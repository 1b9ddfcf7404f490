"""Triton kernels of the vocabulary-parallel objective: the same five per-shard functions as
:mod:`megatron_sdar.algo.fused_kernels` (log-sum-exp statistics, KL statistics, and the
gradients of log-probs + entropy, reverse KL and forward KL), on this rank's vocabulary shard.

Why a kernel of our own: the ``torch.compile`` kernels reduce one row per program, and a chunk of
128 rows leaves most of an H100's 132 SMs idle. Here the grid is ``rows x vocabulary blocks``
(1,024 columns each), so a chunk of 128 rows at V = 151,936 launches ~9,500 programs; each
writes its block's partial statistics (max, sum of exponentials, weighted sums relative to its
own max) and a few tensor ops combine the blocks exactly (re-basing each on the row max, the same
algebra as :func:`~megatron_sdar.algo.fused_kernels.rescale_to_global_max` across TP ranks). The
gradients are elementwise over the same grid.

Tested against the eager kernels and the float64 reference on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, small shapes; tests/test_algo_vocab_parallel.py); timed on a GPU by
``tools/bench_objective.py --device cuda`` (variants ``triton_*``). Selected with
``algo.kernel=triton``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 1024


def block_size(n_cols: int) -> int:
    """Columns per program: 1,024 on real vocabularies; on small ones (tests) a quarter of the row,
    so a row still spans several blocks."""
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(triton.cdiv(n_cols, 4))))


@triton.jit
def _lse_partials(z_ptr, stride, n_cols, m_ptr, s_ptr, a_ptr, n_blocks, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(z_ptr + row * stride + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
    m = tl.max(z, 0)
    shifted = z - m
    e = tl.where(z > -float("inf"), tl.exp(shifted), 0.0)
    out = row * n_blocks + blk
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, tl.sum(e, 0))
    tl.store(a_ptr + out, tl.sum(tl.where(e > 0, e * shifted, 0.0), 0))


@triton.jit
def _kl_partials(zo_ptr, zi_ptr, stride_o, stride_i, n_cols, mo_ptr, so_ptr, mi_ptr, si_ptr, d_ptr, n_blocks,
                 BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    zo = tl.load(zo_ptr + row * stride_o + cols, mask=valid, other=-float("inf")).to(tl.float32)
    zi = tl.load(zi_ptr + row * stride_i + cols, mask=valid, other=-float("inf")).to(tl.float32)
    mo, mi = tl.max(zo, 0), tl.max(zi, 0)
    eo = tl.where(zo > -float("inf"), tl.exp(zo - mo), 0.0)
    ei = tl.where(zi > -float("inf"), tl.exp(zi - mi), 0.0)
    out = row * n_blocks + blk
    tl.store(mo_ptr + out, mo)
    tl.store(so_ptr + out, tl.sum(eo, 0))
    tl.store(mi_ptr + out, mi)
    tl.store(si_ptr + out, tl.sum(ei, 0))
    tl.store(d_ptr + out, tl.sum(tl.where(eo > 0, eo * (zo - zi), 0.0), 0))


@triton.jit
def _logprob_entropy_grad_kernel(out_ptr, z_ptr, stride_out, stride_z, n_cols, log_norm_ptr, linear_ptr,
                                 coef_ptr, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    z = tl.load(z_ptr + row * stride_z + cols, mask=valid, other=-float("inf")).to(tl.float32)
    log_p = z - tl.load(log_norm_ptr + row)
    p = tl.where(z > -float("inf"), tl.exp(log_p), 0.0)
    g = tl.where(p > 0, -p * (tl.load(linear_ptr + row) + tl.load(coef_ptr + row) * log_p), 0.0)
    tl.store(out_ptr + row * stride_out + cols, g.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _reverse_kl_grad_kernel(out_ptr, zs_ptr, zt_ptr, stride_out, stride_s, stride_t, n_cols, log_norm_ptr,
                            offset_ptr, grad_ptr, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    zs = tl.load(zs_ptr + row * stride_s + cols, mask=valid, other=-float("inf")).to(tl.float32)
    zt = tl.load(zt_ptr + row * stride_t + cols, mask=valid, other=0.0).to(tl.float32)
    p = tl.where(zs > -float("inf"), tl.exp(zs - tl.load(log_norm_ptr + row)), 0.0)
    g = tl.where(p > 0, p * ((zs - zt) - tl.load(offset_ptr + row)), 0.0) * tl.load(grad_ptr + row)
    tl.store(out_ptr + row * stride_out + cols, g.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _forward_kl_grad_kernel(out_ptr, zs_ptr, zt_ptr, stride_out, stride_s, stride_t, n_cols, lns_ptr, lnt_ptr,
                            grad_ptr, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    zs = tl.load(zs_ptr + row * stride_s + cols, mask=valid, other=-float("inf")).to(tl.float32)
    zt = tl.load(zt_ptr + row * stride_t + cols, mask=valid, other=-float("inf")).to(tl.float32)
    ps = tl.where(zs > -float("inf"), tl.exp(zs - tl.load(lns_ptr + row)), 0.0)
    pt = tl.where(zt > -float("inf"), tl.exp(zt - tl.load(lnt_ptr + row)), 0.0)
    tl.store(out_ptr + row * stride_out + cols, ((ps - pt) * tl.load(grad_ptr + row)).to(out_ptr.dtype.element_ty),
             mask=valid)


def _grid(z: torch.Tensor) -> tuple[int, int]:
    return z.shape[0], triton.cdiv(z.shape[1], block_size(z.shape[1]))


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"expected [rows, V] tensors with contiguous rows, got {tuple(t.shape)} {t.stride()}")


def _combine(maxes: torch.Tensor, *sums: torch.Tensor):
    """Block partials ``[n, nb]`` (each relative to its block's max) -> row values relative to the
    row max; blocks with no finite logit (max -inf) contribute 0."""
    row_max = maxes.amax(-1)
    scale = torch.where(maxes > -float("inf"), torch.exp(maxes - row_max[:, None]), torch.zeros_like(maxes))
    return row_max, [(s * scale).sum(-1) for s in sums], scale


def lse_stats(z: torch.Tensor):
    """Local ``(m, S, A)`` per row: ``m = max z``, ``S = sum e``, ``A = sum e (z - m)``, ``e = exp(z - m)``."""
    _check(z)
    n, nb = _grid(z)
    m, s, a = (torch.empty(n, nb, dtype=torch.float32, device=z.device) for _ in range(3))
    _lse_partials[(n, nb)](z, z.stride(0), z.shape[1], m, s, a, nb, BLOCK=block_size(z.shape[1]))
    row_max, (total,), scale = _combine(m, s)
    # A_row = sum_b (A_b + (m_b - m) S_b) scale_b
    shift = torch.where(s > 0, (m - row_max[:, None]) * s, torch.zeros_like(s))
    return row_max, total, ((a + shift) * scale).sum(-1)


def kl_stats(z_out: torch.Tensor, z_in: torch.Tensor):
    """Local ``(m_out, S_out, m_in, S_in, D)``, ``D = sum e_out (z_out - z_in)``, ``e_out = exp(z_out - m_out)``."""
    _check(z_out, z_in)
    n, nb = _grid(z_out)
    mo, so, mi, si, d = (torch.empty(n, nb, dtype=torch.float32, device=z_out.device) for _ in range(5))
    _kl_partials[(n, nb)](z_out, z_in, z_out.stride(0), z_in.stride(0), z_out.shape[1], mo, so, mi, si, d, nb,
                          BLOCK=block_size(z_out.shape[1]))
    m_out, (s_out, d_out), _ = _combine(mo, so, torch.where(so > 0, d, torch.zeros_like(d)))
    m_in, (s_in,), _ = _combine(mi, si)
    return m_out, s_out, m_in, s_in, d_out


def logprob_entropy_grad(out, z, log_norm, linear, entropy_coef):
    """``out = -p (linear + entropy_coef * log p)``, ``p = exp(z - logZ)`` (0 where ``p = 0``), in place."""
    _check(out, z)
    _logprob_entropy_grad_kernel[_grid(z)](out, z, out.stride(0), z.stride(0), z.shape[1], log_norm.contiguous(),
                                           linear.contiguous(), entropy_coef.contiguous(),
                                           BLOCK=block_size(z.shape[1]))


def reverse_kl_grad(out, zs, zt, log_norm_s, offset, grad_div):
    """``out = pS (zS - zT - offset) * grad``, in place."""
    _check(out, zs, zt)
    _reverse_kl_grad_kernel[_grid(zs)](out, zs, zt, out.stride(0), zs.stride(0), zt.stride(0), zs.shape[1],
                                       log_norm_s.contiguous(), offset.contiguous(), grad_div.contiguous(),
                                       BLOCK=block_size(zs.shape[1]))


def forward_kl_grad(out, zs, zt, log_norm_s, log_norm_t, grad_div):
    """``out = (pS - pT) * grad``, in place."""
    _check(out, zs, zt)
    _forward_kl_grad_kernel[_grid(zs)](out, zs, zt, out.stride(0), zs.stride(0), zt.stride(0), zs.shape[1],
                                       log_norm_s.contiguous(), log_norm_t.contiguous(), grad_div.contiguous(),
                                       BLOCK=block_size(zs.shape[1]))
