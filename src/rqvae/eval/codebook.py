"""The codebook doctor (``rqvae codebook``): how an RQ-VAE's codes are used, depth by depth.

For images of a dataset: per depth, the codes used, perplexity, codes never chosen ("dead" on this data),
the share of the most used code, and the relative norm of the residual left after the first d codes,
``E||z - sum_{i<=d} e(k_i)|| / E||z||`` (how much of the encoder output the first d depths explain; a depth
that does not lower it adds nothing). Plus a PNG: code-usage curves (sorted counts) per depth and the
residual norm against depth. Optionally, for temperatures tau, how soft stage 2's targets (paper Eq. 15) would
be on this tokenizer: tau divides squared latent distances, so the paper's 0.5 can be near-uniform here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rqvae.eval.batches import dataset_batches
from rqvae.train.ar_loss import soft_label_stats


@torch.no_grad()
def codebook_report(vae: torch.nn.Module, dataset: Any, count: int | None = 2000, batch_size: int = 100,
                    seed: int = 0, temperatures: Sequence[float] = ()) -> dict[str, Any]:
    """Code usage and residual norms per depth over ``count`` images of ``dataset`` (all if None); for each
    of ``temperatures``, how soft stage 2's targets would be (:func:`soft_label_stats`, per depth)."""
    vae.eval()
    rq = vae.quantizer
    D, K = rq.depth, rq.codebook_size
    soft = {float(t): torch.zeros(2, D, dtype=torch.float64) for t in temperatures}
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(D, K, dtype=torch.float64)
    res_norm = torch.zeros(D + 1, dtype=torch.float64)  # sum over vectors of ||r_d||, d = 0..D
    n = 0
    for x in dataset_batches(dataset, batch_size, count=count, seed=seed):
        z = vae.encode_latent(x).reshape(-1, rq.dim).float()  # (N, n_z)
        codes = rq.encode(z)  # (N, D)
        for t, acc in soft.items():  # sums over vectors of (entropy, drawn == greedy) per depth
            st = soft_label_stats(rq, z, t, gen, greedy=codes)
            acc += torch.tensor([st["entropy_bits"], st["greedy_share"]], dtype=torch.float64) * z.shape[0]
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
    soft_labels = [{"temperature": t, "entropy_bits": (acc[0] / n).tolist(),
                    "greedy_share": (acc[1] / n).tolist()} for t, acc in soft.items()]
    return {"vectors": n, "codebook_size": K, "depth": D, "per_depth": depths, "counts": counts.tolist(),
            "soft_labels": soft_labels}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['vectors']} vectors, K = {report['codebook_size']}, D = {report['depth']}",
             f"{'depth':>5} {'used':>6} {'dead':>6} {'perplexity':>11} {'top code':>9} {'residual':>9}"]
    for r in report["per_depth"]:
        lines.append(f"{r['depth']:>5} {r['used']:>6} {r['dead']:>6} {r['perplexity']:>11.1f} "
                     f"{r['top_code_share']:>9.1%} {r['residual_norm']:>9.3f}")
    lines.append("residual: E||z - first d codes|| / E||z||; dead: never chosen on this data")
    if report.get("soft_labels"):
        lines += ["", "stage 2's soft labels per depth: target entropy in bits (uniform: "
                  f"{math.log2(report['codebook_size']):.2f}) / share of drawn codes equal to the greedy "
                  "ones",
                  *(f"  temperature {r['temperature']:g}: "
                    + "  ".join(f"{e:.2f} / {g:.0%}" for e, g in zip(r["entropy_bits"], r["greedy_share"]))
                    for r in report["soft_labels"])]
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
