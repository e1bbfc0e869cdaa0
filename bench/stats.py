"""Seed statistics for the result tables: mean, sample std, Student-t confidence intervals,
and the paired difference of a variant to its ablation's baseline.

A variant and its baseline are paired by seed: the difference of seed s is
``ours[s] - baseline[s]``, and its interval comes from the spread of those differences.
A seed fixes the data subset and each epoch's shuffle order (``bench.train.EpochSeed``),
so the two runs of a seed share part of their randomness, which pairing takes out of
the comparison.

The interval of n values is ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` with s the sample
standard deviation (n - 1 in the denominator) and t Student's quantile (``scipy.stats.t``);
with fewer than two values there is no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95

ABOVE = "above the baseline beyond seed noise"
WITHIN = "within noise"
BELOW = "below the baseline"
TOO_FEW = "n too small"


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample std and a two-sided t interval (None where n is too small)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def _checked(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"statistics need finite numbers, got {bad[0]!r} among {out}")
    return out


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The Student-t interval of the mean of `values` (n - 1 degrees of freedom), or None
    for fewer than two values."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    values = _checked(values)
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = _scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / n**0.5
    return mean - half, mean + half


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample std (n >= 2) and t interval (n >= 2) of `values`."""
    values = _checked(values)
    interval = t_interval(values, confidence)
    return Summary(
        n=len(values),
        mean=statistics.fmean(values) if values else None,
        std=statistics.stdev(values) if len(values) >= 2 else None,
        low=interval[0] if interval else None,
        high=interval[1] if interval else None,
    )


def paired_differences(
    ours: Mapping[int, float], baseline: Mapping[int, float]
) -> dict[int, float]:
    """``ours[s] - baseline[s]`` for every seed s that both have, in seed order."""
    return {s: float(ours[s]) - float(baseline[s]) for s in sorted(set(ours) & set(baseline))}


def verdict(difference: Summary) -> str:
    """What the interval of a paired difference says about a variant against the baseline."""
    if difference.n < 2 or difference.low is None or difference.high is None:
        return TOO_FEW
    if difference.low > 0:
        return ABOVE
    if difference.high < 0:
        return BELOW
    return WITHIN
