"""Confidence intervals over independent seeds: every reported metric is a mean ± a
Student-t 95% interval, because three to five seeds are too few for a normal one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """``mean ± half`` over ``n`` values; ``half`` is None for a single value."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def __contains__(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval (a single value: equals the mean)."""
        return value == self.mean if self.half is None else self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if self.half is None else f"{self.mean:.2f} ± {self.half:.2f}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with the two-sided Student-t interval of the given confidence:
    ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values is empty: no seed to summarise")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"values must be finite, got {xs}")
    n, mean = len(xs), sum(xs) / len(xs)
    if n == 1:
        return Interval(mean, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n), n)
