"""The Table 4 figure: rFID and PSNR bars with the seed spread, and every validation curve."""

from __future__ import annotations

from pathlib import Path

from claims.experiments import TOKENIZERS


def plot_table4(rows: dict, path: Path) -> Path:
    import matplotlib  # slow import (~1 s): only when the plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    names = [n for n in TOKENIZERS if n in rows]
    for ax, key, title in ((axes[0], "rfid", "rFID (lower is better)"), (axes[1], "psnr", "PSNR dB")):
        colors = ["tab:blue" if n.startswith("vq") else "tab:orange" for n in names]
        ax.barh([rows[n]["label"] for n in names], [rows[n][key] for n in names], color=colors,
                xerr=[rows[n].get(f"{key}_spread", 0) for n in names], capsize=3)
        ax.set_title(title + ", mean +- half the seed range")
        ax.invert_yaxis()
    floor = next((rows[n]["floor"] for n in names if "floor" in rows[n]), None)
    if floor is not None:  # what real images score against the same test images at this size
        axes[0].axvline(floor, color="black", linestyle="--", linewidth=1)
        axes[0].annotate(f"floor {floor:.2f}", (floor, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax = axes[2]
    for i, n in enumerate(names):
        for j, pts in enumerate(rows[n].get("curves", [])):
            steps, vals = zip(*pts) if pts else ((), ())
            ax.plot(steps, vals, color=f"C{i}", alpha=1.0 if j == 0 else 0.5,
                    label=rows[n]["label"] if j == 0 else None)
    ax.set_title("validation PSNR dB (every seed)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST tokenizers: VQ (blue) vs RQ (orange), same training recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
