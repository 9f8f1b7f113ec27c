"""The codebook doctor (``rqvae codebook``): how an RQ-VAE's codes are used, depth by depth.

For images of a dataset: per depth, the codes used, perplexity, codes never chosen ("dead" on this data),
the share of the most used code, and the relative norm of the residual left after the first d codes,
``E||z - sum_{i<=d} e(k_i)|| / E||z||`` (how much of the encoder output the first d depths explain; a depth
that does not lower it adds nothing). Plus a PNG: code-usage curves (sorted counts) per depth and the
residual norm against depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rqvae.eval.batches import dataset_batches


@torch.no_grad()
def codebook_report(vae: torch.nn.Module, dataset: Any, count: int | None = 2000, batch_size: int = 100,
                    seed: int = 0) -> dict[str, Any]:
    """Code usage and residual norms per depth over ``count`` images of ``dataset`` (all if None)."""
    vae.eval()
    rq = vae.quantizer
    D, K = rq.depth, rq.codebook_size
    counts = torch.zeros(D, K, dtype=torch.float64)
    res_norm = torch.zeros(D + 1, dtype=torch.float64)  # sum over vectors of ||r_d||, d = 0..D
    n = 0
    for x in dataset_batches(dataset, batch_size, count=count, seed=seed):
        z = vae.encode_latent(x).reshape(-1, rq.dim).float()  # (N, n_z)
        codes = rq.encode(z)  # (N, D)
        for d in range(D):
            counts[d] += torch.bincount(codes[:, d], minlength=K).double()
        res_norm[0] += z.norm(dim=1).sum().double()
        for d in range(1, D + 1):
            res_norm[d] += (z - rq.decode(codes[:, :d])).norm(dim=1).sum().double()
        n += z.shape[0]
    p = counts / counts.sum(dim=1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    rel = (res_norm / res_norm[0]).tolist()
    depths = [{"depth": d + 1, "used": int((counts[d] > 0).sum()), "dead": int((counts[d] == 0).sum()),
               "perplexity": float(entropy[d].exp()), "top_code_share": float(p[d].max()),
               "residual_norm": rel[d + 1], "explained": rel[d] - rel[d + 1]} for d in range(D)]
    return {"vectors": n, "codebook_size": K, "depth": D, "per_depth": depths, "counts": counts.tolist()}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['vectors']} vectors, K = {report['codebook_size']}, D = {report['depth']}",
             f"{'depth':>5} {'used':>6} {'dead':>6} {'perplexity':>11} {'top code':>9} {'residual':>9}"]
    for r in report["per_depth"]:
        lines.append(f"{r['depth']:>5} {r['used']:>6} {r['dead']:>6} {r['perplexity']:>11.1f} "
                     f"{r['top_code_share']:>9.1%} {r['residual_norm']:>9.3f}")
    lines.append("residual: E||z - first d codes|| / E||z||; dead: never chosen on this data")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Sorted code-usage curves per depth, and the residual norm against depth."""
    import matplotlib  # matplotlib is slow to import; only this figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for d, row in enumerate(report["counts"], start=1):
        c = torch.tensor(row)
        ax1.plot((c.sort(descending=True).values / c.sum()).numpy(), label=f"depth {d}")
    ax1.set(xlabel="code rank", ylabel="share of vectors", yscale="log", title="code usage (sorted)")
    ax1.legend()
    per = report["per_depth"]
    ax2.plot([0] + [r["depth"] for r in per], [1.0] + [r["residual_norm"] for r in per], marker="o")
    ax2.set(xlabel="depth d", ylabel="E||r_d|| / E||z||", title="residual after d codes", ylim=(0, 1.05))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
