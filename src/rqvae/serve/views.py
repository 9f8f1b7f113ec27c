"""What the page shows of one code map: the reconstructions from the first d codes (d = 1..D), a heat map
of where each depth changes the image, PSNR per depth against an uploaded image, and the codes file."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from safetensors.torch import save

from rqvae.data.images import tensor_to_pil

CODES_FORMAT = "rqvae-codes/1"  # the format `rqvae encode` writes and `rqvae decode` reads
HEAT_CMAP = matplotlib.colormaps["inferno"]


@dataclass
class Views:
    """PNG bytes per depth (index d - 1) and per-depth numbers for one image."""

    images: list[bytes]  # X^(d), decoded from the first d codes
    heat: list[bytes]  # |X^(d) - X^(d-1)| per pixel, colour-mapped, scaled to its own maximum
    change: list[float]  # mean |X^(d) - X^(d-1)| per depth, on the [0, 1] intensity scale
    psnr: list[float] | None  # dB of X^(d) against the uploaded image (None for generated images)


def png_bytes(x: torch.Tensor) -> bytes:
    """(C, H, W) in [-1, 1] -> PNG file bytes."""
    buf = io.BytesIO()
    tensor_to_pil(x).save(buf, format="PNG")
    return buf.getvalue()


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), capped at 100 dB for identical images."""
    mse = float(((x.float().clamp(-1, 1) - ref.float()) ** 2).mean())
    return 100.0 if mse == 0 else round(float(10 * np.log10(4.0 / mse)), 3)


def heat_png(diff: torch.Tensor) -> bytes:
    """(H, W) non-negative change -> a colour-mapped PNG, scaled so that the largest change is bright."""
    a = diff.float().cpu().numpy()
    top = float(a.max())
    rgb = HEAT_CMAP(a / top if top > 0 else a)[..., :3]  # (H, W, 3) in [0, 1]
    t = torch.from_numpy(rgb).permute(2, 0, 1).float() * 2 - 1  # (3, H, W) in [-1, 1]
    return png_bytes(t)


@torch.no_grad()
def coarse_to_fine(vae, codes: torch.Tensor) -> torch.Tensor:
    """codes (1, h, w, D) -> images (D + 1, C, H, W) in [-1, 1]: X^(0) ... X^(D), where X^(d) decodes the
    sum of the first d code embeddings (X^(0) decodes the empty sum, a zero latent)."""
    D = codes.shape[-1]
    codes = codes.to(vae.post_quant_conv.weight.device)
    z = [vae.quantizer.decode(codes[..., :d]) for d in range(1, D + 1)]  # D x (1, h, w, n_z)
    z = torch.cat([torch.zeros_like(z[0]), *z])  # (D + 1, h, w, n_z)
    return vae.decode_latent(z).float().clamp(-1, 1).cpu()


def make_views(vae, codes: torch.Tensor, original: torch.Tensor | None = None) -> Views:
    """All the depth views of one code map; with ``original`` (C, H, W), PSNR per depth too."""
    x = coarse_to_fine(vae, codes)  # (D + 1, C, H, W)
    diff = (x[1:] - x[:-1]).abs().mean(dim=1) / 2  # (D, H, W) on the [0, 1] scale
    return Views(images=[png_bytes(im) for im in x[1:]], heat=[heat_png(d) for d in diff],
                 change=[round(float(d.mean()), 5) for d in diff],
                 psnr=None if original is None else [psnr(im, original) for im in x[1:]])


def codes_file(codes: torch.Tensor, cfg, *, model_dir: Path, sha256: str, source: str) -> bytes:
    """A ``.safetensors`` codes file as `rqvae encode` writes it: tensor "codes" (1, h, w, D) + metadata."""
    meta = {"format": CODES_FORMAT, "code_shape": json.dumps(list(codes.shape[1:])),
            "model_path": str(model_dir.resolve()), "model_sha256": sha256, "sources": json.dumps([source])}
    meta.update({k: str(getattr(cfg, k)) for k in ("codebook_size", "depth", "image_size", "in_channels")})
    return save({"codes": codes.to("cpu", torch.int64).contiguous()}, metadata=meta)
