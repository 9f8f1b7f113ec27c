"""``results.json``: rows saved as they finish, so an interrupted run continues where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, results: dict) -> None:
    """Merge into the file (keeping rows another invocation wrote), atomically.

    Rows found in the file are merged into ``results``' own dicts in place: callers hold references to
    them (``rows = results["table4"]``), so replacing the dicts would drop rows added later."""
    merged = load(path)
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    for key, value in merged.items():
        if isinstance(value, dict) and isinstance(results.get(key), dict):
            results[key].update(value)
        else:
            results[key] = value
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)


def training_seconds(run: Path, measured: float) -> float:
    """Wall time of a training run: measured now, or (for a model trained by an earlier invocation) from
    the run folder's files: train_config.json is written at the start, metrics.jsonl last at the end."""
    if measured > 5 or not (run / "train_config.json").is_file() or not (run / "metrics.jsonl").is_file():
        return measured
    return (run / "metrics.jsonl").stat().st_mtime - (run / "train_config.json").stat().st_mtime
