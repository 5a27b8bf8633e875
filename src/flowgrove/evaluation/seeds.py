"""Statistics over seeds (pure Python): the mean and 95 % confidence interval of a value measured once per seed, and
when a reward curve first reaches a target. ``flowgrove bench --seeds N`` reports every number through these.

The interval is Student's t: ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
(ddof 1), the half-width reported as ``ci95``. One value has no spread to estimate: ``ci95`` is NaN (null in JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), rounded to 6 decimals).
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z975 = 1.959963984540054  # the standard normal's 97.5 % quantile


def t975(df: int) -> float:
    """Student-t 97.5 % quantile with ``df`` degrees of freedom: the table up to 30, above it the Cornish-Fisher
    expansion in 1/df to the fourth order (within 3e-8 of the exact value for every df > 30)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z, v = Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


@dataclass(frozen=True)
class Summary:
    """Mean and 95 % CI half-width over ``n`` seeds; NaN mean for no value, NaN ``ci95`` for fewer than two."""

    mean: float
    ci95: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def as_dict(self) -> dict:
        """``{"mean", "ci95", "n"}`` with NaN as None (JSON has no NaN)."""
        return {"mean": _none_if_nan(self.mean), "ci95": _none_if_nan(self.ci95), "n": self.n}


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(values: Sequence[float]) -> Summary:
    """Mean and the half-width of the 95 % t interval of ``values`` (one per seed)."""
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(mean, math.nan, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(mean, t975(n - 1) * s / math.sqrt(n), n)


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The first ``x`` at which the piecewise-linear curve through ``(xs, ys)`` reaches ``target`` (``y >= target``):
    linear interpolation between the last point below and the first point at or above it; ``xs[0]`` if the curve
    starts there; None if no point reaches it."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0))
    return None
