"""Seed-to-seed spread: a difference between two settings counts only when it is larger than the spread
of either setting over its seeds; smaller differences are "no difference"."""

from __future__ import annotations

import statistics


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, spread = max - min over the seeds; 0 for one seed)."""
    return statistics.fmean(values), (max(values) - min(values)) if values else float("nan")


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_spread(values)
    return f"{m:.{digits}f} +- {s / 2:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f} (1 seed)"


def compare(a: list[float], b: list[float], *, lower_is_better: bool) -> tuple[float, str]:
    """(mean(b) - mean(a), "b better" / "a better" / "no difference" / "undecided (one seed)")."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    diff = mb - ma
    if len(a) < 2 or len(b) < 2:
        return diff, "undecided (one seed: no spread measured)"
    if abs(diff) <= max(sa, sb):
        return diff, "no difference"
    return diff, "b better" if (diff < 0) == lower_is_better else "a better"
