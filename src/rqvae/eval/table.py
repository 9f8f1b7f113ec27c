"""The text table that ``rqvae eval`` prints (its JSON output holds the same numbers)."""

from __future__ import annotations

from typing import Any


def format_table(results: dict[str, Any]) -> str:
    """A readable text table of the results of ``rqvae eval`` (the JSON holds the same numbers)."""
    lines: list[str] = []

    def row(name: str, value: Any) -> None:
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"  {name:<28} {value}")

    if "reference" in results:
        r = results["reference"]
        lines.append("reference statistics")
        row("reference", r["ref"])
        row("images", r["count"])
        row("file", f"{r['stats']}{' (cached)' if r['cached'] else ''}")
    if "fid" in results:
        r = results["fid"]
        lines.append("FID")
        row("generated", f"{r['generated']} ({r['num_generated']} images at {r['image_size']}px)")
        row("FID", r["fid"])
        if "floor" in r:
            row("floor (real vs reference)", r["floor"])
            row("FID - floor", r["fid"] - r["floor"])
    if "tokenizer" in results:
        r = results["tokenizer"]
        lines.append(f"tokenizer {r.get('model', '')} on {r['data']} ({r['split']}, "
                     f"{r['num_images']} images)")
        if "rfid" in r:
            row("rFID", r["rfid"])
        if "per_depth" in r:
            lines.append(f"  {'depth':>5} {'MSE':>10} {'PSNR (dB)':>10} {'SSIM':>8}")
            for d in r["per_depth"]:
                lines.append(f"  {d['depth']:>5} {d['mse']:>10.5f} {d['psnr']:>10.3f} {d['ssim']:>8.4f}")
            u = r["code_usage"]
            lines.append(f"  code usage (of K = {u['codebook_size']}) per depth:")
            for i, (used, ppl) in enumerate(zip(u["used"], u["perplexity"]), 1):
                lines.append(f"  {i:>5} used {used:>6}  perplexity {ppl:10.2f}")
    if "clip" in results:
        r = results["clip"]
        lines.append(f"CLIP score ({r['n']} image/caption pairs of {r['samples']})")
        row("CLIP score", r["score"])
    if "classifier" in results:
        r = results["classifier"]
        lines.append(f"class-conditional samples (classifier {r['classifier']})")
        if "accuracy" in r:
            row("accuracy", f"{r['accuracy']:.4f} ({r['num_samples']} samples)")
        if "classifier_score" in r:
            row("classifier score", f"{r['classifier_score']:.4f} +- {r['classifier_score_std']:.4f}")
    return "\n".join(lines)
