"""Rates with confidence intervals, over-refusal, and paired base-vs-circuit-broken comparisons.

A rate on 50 prompts has an uncertainty of about +-14 points; a reported ASR without an interval
invites reading noise as an effect. Intervals are percentile bootstraps with a fixed seed (the same
data always gives the same interval), plus the Wilson score interval, which stays informative at
0% and 100% where a bootstrap collapses to a point. Base and circuit-broken models are evaluated on
the same prompts, so their difference is bootstrapped over prompts jointly (paired) and tested with
McNemar's exact test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: the mean) over `values`.

    `statistic` receives an array of shape [n_resamples, n] and returns one value per row.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    samples = data[rng.integers(0, data.size, size=(n_resamples, data.size))]
    stats = statistic(samples) if statistic is not None else samples.mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """k of n, with a bootstrap interval [low, high] and a Wilson interval."""

    value: float
    low: float
    high: float
    k: int
    n: int
    wilson_low: float
    wilson_high: float
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] ({self.k}/{self.n})"


def rate(
    flags: Sequence[bool], n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0
) -> Rate:
    """The share of True in `flags` with its intervals."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    low, high = bootstrap_ci([float(bool(f)) for f in flags], None, n_resamples, confidence, seed)
    w_low, w_high = wilson_interval(k, n, confidence)
    return Rate(k / n if n else math.nan, low, high, k, n, w_low, w_high, confidence)


def best_of_n(flags: Sequence[bool], groups: Sequence[Any]) -> list[bool]:
    """One flag per group (prompt): True if any variant (template, restart) succeeded.

    Attacks with several variants per prompt are scored per prompt this way; the groups come out in
    order of first appearance.
    """
    if len(flags) != len(groups):
        raise ValueError("one group key per flag")
    merged: dict[Any, bool] = {}
    for flag, group in zip(flags, groups):
        merged[group] = merged.get(group, False) or bool(flag)
    return list(merged.values())


def per_category(flags: Sequence[bool], categories: Sequence[str | None], seed: int = 0) -> dict[str, Rate]:
    """A rate per category (e.g. HarmBench semantic category), sorted by name."""
    if len(flags) != len(categories):
        raise ValueError("one category per flag")
    groups: dict[str, list[bool]] = {}
    for flag, category in zip(flags, categories):
        groups.setdefault(category or "uncategorised", []).append(bool(flag))
    return {name: rate(values, seed=seed) for name, values in sorted(groups.items())}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial test at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """other - base on the same items, with a paired bootstrap interval and McNemar's exact test.

    `base_only` counts items where only the base model was flagged, `other_only` the reverse.
    """

    base: float
    other: float
    difference: float
    low: float
    high: float
    n: int
    base_only: int
    other_only: int
    p_value: float
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(
    base_flags: Sequence[bool],
    other_flags: Sequence[bool],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedDifference:
    """Difference of two rates measured on the same items (e.g. ASR circuit-broken - ASR base).

    Resampling items (not the two models separately) keeps the pairing, so the interval reflects
    how much the two models differ on the same prompts.
    """
    if len(base_flags) != len(other_flags):
        raise ValueError(f"paired rates need the same items: {len(base_flags)} vs {len(other_flags)}")
    a = np.asarray([float(bool(f)) for f in base_flags])
    b = np.asarray([float(bool(f)) for f in other_flags])
    n = a.size
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 1.0, confidence)
    low, high = bootstrap_ci(b - a, None, n_resamples, confidence, seed)
    base_only = int(((a == 1) & (b == 0)).sum())
    other_only = int(((a == 0) & (b == 1)).sum())
    return PairedDifference(
        float(a.mean()),
        float(b.mean()),
        float(b.mean() - a.mean()),
        low,
        high,
        n,
        base_only,
        other_only,
        mcnemar_exact(base_only, other_only),
        confidence,
    )
