"""Reading and writing images, and tiling them into grids.  Tensors hold images in [-1, 1]."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rqvae.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, by image extension, sorted) into a list of files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images")
    if not out:
        raise UserError("no images given; pass image files or folders of images")
    return out


def load_image(path: str | os.PathLike, channels: int = 3, size: int | None = None) -> Image.Image:
    """Open an image as RGB (channels=3) or L (channels=1); with `size`, resize the short side to `size`
    and center-crop to size x size.  Transparent pixels are composited on white."""
    path = Path(path)
    try:
        with Image.open(path) as f:
            f.load()
            im = ImageOps.exif_transpose(f)  # a loaded copy, usable after the file is closed
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable image ({type(e).__name__}); remove it or convert it "
                        "to PNG/JPEG") from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    im = im.convert("RGB" if channels == 3 else "L")
    if size is not None:
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
    return im


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (RGB or L) -> (C, H, W) float32 in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] (clamped) -> PIL image, RGB for C = 3 and L for C = 1."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise UserError(f"expected an image tensor of shape (1 or 3, H, W), got {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)  # uint8 (H, W) -> L, (H, W, 3) -> RGB


def load_images(paths: Sequence[str | os.PathLike], channels: int, size: int) -> torch.Tensor:
    """Files -> (N, C, size, size) in [-1, 1]."""
    return torch.stack([pil_to_tensor(load_image(p, channels, size)) for p in paths])


def save_image(x: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (C, H, W) tensor in [-1, 1] as PNG (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(x).save(path, format="PNG")
    return path


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images row-major into `nrow` columns with `padding` pixels of `pad_value` between
    and around them: -> (C, rows*(H+p)+p, nrow*(W+p)+p)."""
    if images.ndim != 4:
        raise UserError(f"make_grid expects (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    p = padding
    grid = images.new_full((c, nrows * (h + p) + p, ncol * (w + p) + p), pad_value)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = p + r * (h + p), p + col * (w + p)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid
