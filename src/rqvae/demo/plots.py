"""The demo's plots: loss curves read from each run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_loss_series(runs: dict[str, Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Run name -> scalar name (every scalar named *loss*) -> [(step, value)] from each metrics.jsonl."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, run in runs.items():
        f = run / "metrics.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step")
            for k, v in row.items():
                if "loss" in k and isinstance(v, (int, float)) and step is not None:
                    series.setdefault(name, {}).setdefault(k, []).append((int(step), float(v)))
    return series


def plot_loss_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """Loss curves from each run's metrics.jsonl (one panel per run, every scalar named *loss*); None when
    no run has logged a loss."""
    import matplotlib  # slow import (~1 s): only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_loss_series(runs)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], series.items()):
        for k, pts in sorted(curves.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        values = [v for pts in curves.values() for _, v in pts]
        if min(values) <= 0:  # e.g. the generator's GAN loss: log scale with a linear band around 0
            ax.set_yscale("symlog", linthresh=1e-2)
        elif max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
