"""Plateau evidence from a run's ``metrics.jsonl``: the last value of a metric, the one a logging interval
before it, and the relative change between them."""

from __future__ import annotations

import json
from pathlib import Path


def curve(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row of ``run/metrics.jsonl`` that logged ``key`` (a resumed run's repeated
    steps keep their last value)."""
    path = run / "metrics.jsonl"
    points: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if key in row:
                points[int(row["step"])] = float(row[key])
    return sorted(points.items())


def plateau(run: Path, key: str) -> dict:
    """:func:`plateau_of` the run's logged ``key``."""
    return plateau_of(curve(run, key), key)


def plateau_of(pts: list, key: str) -> dict:
    """{"key", "curve", "last_two", "rel_change"}: rel_change = (last - previous) / |previous|, previous being
    the latest value at least half a typical logging interval (the median gap) before the last one: the
    validation a run adds at its very end (e.g. steps 1998 and 2000) would otherwise show no change at all."""
    pts = [tuple(p) for p in pts]
    out: dict = {"key": key, "curve": pts}
    if len(pts) >= 2:
        gaps = sorted(b[0] - a[0] for a, b in zip(pts, pts[1:]))
        half = gaps[len(gaps) // 2] / 2
        last = pts[-1]
        prev = [p for p in pts[:-1] if last[0] - p[0] >= half][-1]
        out["last_two"] = [prev, last]
        out["rel_change"] = (last[1] - prev[1]) / abs(prev[1]) if prev[1] else float("nan")
    return out


def describe(p: dict) -> str:
    if "rel_change" not in p:
        return f"{p['key']}: fewer than two logged values"
    (s0, a), (s1, b) = p["last_two"]
    return f"{p['key']} {a:.4g} (step {s0}) -> {b:.4g} (step {s1}), {100 * p['rel_change']:+.2f}%"
