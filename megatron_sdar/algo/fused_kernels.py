"""Fused per-chunk kernels of the vocabulary-parallel objective (``torch.compile``: Triton on GPU,
vectorized C++ on CPU).

The eager kernels in :mod:`megatron_sdar.algo.vocab_parallel` take ~5-10 passes over a
``[chunk, V_local]`` block; these take one reduction pass (forward) and one elementwise pass
(backward) each. They work on **local** statistics (max over this rank's shard); the caller
combines ranks with :func:`rescale_to_global_max` (rescaling by ``exp(m_local - m_global)``).

Chosen by the objective's ``kernel`` field (``algo.kernel``, :data:`KERNELS`): ``compile`` (these
``torch.compile`` kernels), ``triton`` (the Triton kernels of :mod:`megatron_sdar.algo.triton_kernels`:
a ``rows x vocabulary blocks`` grid) or ``eager`` (the eager kernels of
:mod:`~megatron_sdar.algo.vocab_parallel`; the default, and the fallback). Measured at
4,096 x 151,936: on CPU the compiled kernels are ~2-3x faster than the eager ones (after a one-time
~15 s compilation per process); on an H100 they were *slower* than the eager kernels at the default
128-token chunk (a row-per-program reduction over 128 rows leaves most SMs idle), which is what the
Triton kernels' block grid addresses; they stay opt-in until they are timed on a GPU.
"""
from __future__ import annotations

import functools
import warnings

import torch

KERNELS = ("eager", "compile", "triton")  # the objective's ``kernel`` choices


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ValueError naming them."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _kernel(name: str, kernel: str):
    """The fused ``name`` of ``kernel`` ("compile" or "triton")."""
    if kernel == "triton":
        from megatron_sdar.algo import triton_kernels

        return getattr(triton_kernels, name)
    return _compiled(f"_{name}")


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _lse_stats(z: torch.Tensor):
    """Local ``(m, S, A)``: ``m = max z``, ``S = sum e``, ``A = sum e (z - m)``, ``e = exp(z - m)``."""
    m = z.amax(-1, keepdim=True)
    shifted = z - m
    e = torch.exp(shifted)
    return m.squeeze(-1), e.sum(-1), torch.where(e > 0, e * shifted, _zero(z)).sum(-1)


def _kl_stats(z_out: torch.Tensor, z_in: torch.Tensor):
    """Local ``(m_out, S_out, m_in, S_in, D)`` with ``D = sum e_out (z_out - z_in)``."""
    m_out = z_out.amax(-1, keepdim=True)
    m_in = z_in.amax(-1, keepdim=True)
    e_out = torch.exp(z_out - m_out)
    d = torch.where(e_out > 0, e_out * (z_out - z_in), _zero(z_out)).sum(-1)
    return m_out.squeeze(-1), e_out.sum(-1), m_in.squeeze(-1), torch.exp(z_in - m_in).sum(-1), d


def _logprob_entropy_grad(out, z, log_norm, linear, entropy_coef):
    """``out = -p (linear + entropy_coef * log p)``, ``p = exp(z - logZ)`` (0 where ``p = 0``)."""
    log_p = z - log_norm[:, None]
    p = torch.exp(log_p)
    out.copy_(torch.where(p > 0, -p * (linear[:, None] + entropy_coef[:, None] * log_p), _zero(z)))


def _reverse_kl_grad(out, zs, zt, log_norm_s, offset, grad_div):
    """``out = pS (zS - zT - offset) * grad``, ``offset = lzS - lzT + KL`` (written in place)."""
    p = torch.exp(zs - log_norm_s[:, None])
    out.copy_(torch.where(p > 0, p * ((zs - zt) - offset[:, None]), _zero(zs)) * grad_div[:, None])


def _forward_kl_grad(out, zs, zt, log_norm_s, log_norm_t, grad_div):
    """``out = (pS - pT) * grad`` (written in place)."""
    out.copy_((torch.exp(zs - log_norm_s[:, None]) - torch.exp(zt - log_norm_t[:, None])) * grad_div[:, None])


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    fn = globals()[name]
    try:
        return torch.compile(fn, dynamic=True)
    except Exception as exc:  # no compiler toolchain: the eager function is still exact
        warnings.warn(f"torch.compile unavailable for {name} ({exc}); running it eagerly")
        return fn


def lse_stats(kernel, z):
    return _kernel("lse_stats", kernel)(z)


def kl_stats(kernel, z_out, z_in):
    return _kernel("kl_stats", kernel)(z_out, z_in)


def logprob_entropy_grad(kernel, out, z, log_norm, linear, entropy_coef):
    _kernel("logprob_entropy_grad", kernel)(out, z, log_norm, linear, entropy_coef)


def reverse_kl_grad(kernel, out, zs, zt, log_norm_s, offset, grad_div):
    _kernel("reverse_kl_grad", kernel)(out, zs, zt, log_norm_s, offset, grad_div)


def forward_kl_grad(kernel, out, zs, zt, log_norm_s, log_norm_t, grad_div):
    _kernel("forward_kl_grad", kernel)(out, zs, zt, log_norm_s, log_norm_t, grad_div)


def rescale_to_global_max(local_max, global_max, sums, linear=None):
    """Re-base a rank's ``S = sum exp(z - m)`` (and ``A = sum e (z - m)``) on the global max ``M``.

    ``S_M = S exp(m - M)``; ``A_M = (A + (m - M) S) exp(m - M)``. A shard with no finite logit
    (``m = -inf``) contributes 0.
    """
    scale = torch.exp(local_max - global_max)
    scaled_sums = torch.where(sums > 0, sums * scale, torch.zeros_like(sums))
    if linear is None:
        return scaled_sums
    shift = torch.where(sums > 0, (local_max - global_max) * sums, torch.zeros_like(sums))
    return scaled_sums, (linear + shift) * scale
