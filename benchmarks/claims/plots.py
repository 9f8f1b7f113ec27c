"""The Table 4 bar chart."""

from __future__ import annotations

from pathlib import Path

from claims.experiments import TOKENIZERS


def plot_table4(rows: dict, path: Path) -> Path:
    import matplotlib  # slow import (~1 s): only when the plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "rfid", "rFID (lower is better)"), (axes[1], "psnr", "PSNR dB")):
        names = [n for n in TOKENIZERS if n in rows]
        colors = ["tab:blue" if n.startswith("vq") else "tab:orange" for n in names]
        ax.barh([rows[n]["label"] for n in names], [rows[n][key] for n in names], color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle("Fashion-MNIST tokenizers: VQ (blue) vs RQ (orange), same training recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
