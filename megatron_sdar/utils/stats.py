"""Confidence intervals for the numbers the project reports (held-out success, comparisons)."""
from __future__ import annotations

import math
from statistics import NormalDist

_Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson, "Probable inference, the law of
    succession, and statistical inference", JASA 1927). Better than the normal interval near 0 and 1
    and for small ``trials``; ``(0, 1)`` when there are no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (exact table up to 30,
    Cornish-Fisher expansion beyond, error < 1e-4)."""
    table = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
             2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
             2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(table):
        return table[df - 1]
    z = _Z95
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    return z + g1 / df + g2 / df**2


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over independent runs (seeds); half-width nan
    for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)
