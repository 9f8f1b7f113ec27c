"""Plateau evidence from a run's ``metrics.jsonl``: the last two logged values of a metric and the
relative change between them."""

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
    """{"key", "curve", "last_two", "rel_change"}: rel_change = (last - previous) / |previous|."""
    pts = curve(run, key)
    out: dict = {"key": key, "curve": pts}
    if len(pts) >= 2:
        (_, a), (_, b) = pts[-2], pts[-1]
        out["last_two"] = [pts[-2], pts[-1]]
        out["rel_change"] = (b - a) / abs(a) if a else float("nan")
    return out


def describe(p: dict) -> str:
    if "rel_change" not in p:
        return f"{p['key']}: fewer than two logged values"
    (s0, a), (s1, b) = p["last_two"]
    return f"{p['key']} {a:.4g} (step {s0}) -> {b:.4g} (step {s1}), {100 * p['rel_change']:+.2f}%"
