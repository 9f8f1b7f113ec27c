"""Reading and writing images, and tiling them into grids.  Tensors hold images in [-1, 1].

One decoder serves every path: :func:`load_image` (open, fully decode, convert the mode, then fit to the
square: resize the short side and crop, or resize the long side and pad; :data:`RESIZE_HELP`) raises the
decoder's own error, which the datasets catch to skip and count bad files;
:func:`load_images` (the CLI path) turns it into a :class:`UserError` naming the file.

Huge files (over PIL's ``Image.MAX_IMAGE_PIXELS``, 89 Mpx by default): PIL's DecompressionBombWarning is
replaced by one line per process naming them (:func:`report_huge_images`), and files over twice that limit,
which PIL refuses as decompression bombs, are decoded anyway when they are files the user named (a path, not
bytes from a shard) and listed in the same line: see :data:`HUGE_IMAGES_HELP`.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from rqvae.data.common import logger, reason
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


# ------------------------------------------------------------------------------------------- decoding
def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (channels=3). Transparency is composited on white,
    16/32-bit integer images are scaled to 8 bit, EXIF orientation is applied."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF: keep the pixels as stored
        pass
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I (32-bit int), F (float)
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


HUGE_IMAGES_HELP = ("image files over PIL's decompression-bomb limit (89 Mpx) are decoded, with one warning "
                    "line naming them; so are files over twice that, which PIL refuses: you named them")

_huge_pending: dict[str, bool] = {}  # decoded since the last report: path -> over PIL's error limit
_huge_reported: set[str] = set()  # named in a warning already (per process)


def _open_file(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` without PIL's DecompressionBombWarning/Error: a file over the limit is noted for
    :func:`report_huge_images` instead (the user named the file, so it is decoded whatever its size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img, over_error = Image.open(path), False
        except Image.DecompressionBombError:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # this one file only
            try:
                img, over_error = Image.open(path), True
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.size[0] * img.size[1] > limit and str(path) not in _huge_reported:
        _huge_pending[str(path)] = over_error
    return img


def report_huge_images(after: str = "") -> None:
    """One warning line naming the files over PIL's pixel limit decoded since the last call and not named
    before in this process; ``after`` ends the line (what happens next, e.g. that they are cached)."""
    new = [p for p in _huge_pending if p not in _huge_reported]
    bombs = sum(_huge_pending[p] for p in new)
    _huge_pending.clear()
    if not new:
        return
    _huge_reported.update(new)
    limit = Image.MAX_IMAGE_PIXELS or 0
    shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    note = f" ({bombs} over PIL's decompression-bomb limit of {2 * limit / 1e6:.0f} Mpx, decoded all the " \
           "same)" if bombs else ""
    logger.warning("%d image%s over %.0f Mpx %s decoded (slow): %s%s%s", len(new), "s" * (len(new) > 1),
                   limit / 1e6, "are" if len(new) > 1 else "is", shown, note, f"; {after}" if after else "")


def decode_image(src: str | os.PathLike | bytes, channels: int) -> Image.Image:
    """Open, fully decode (so truncated files fail here, not later) and convert the mode. Files (not bytes)
    over PIL's pixel limit are decoded and noted for :func:`report_huge_images`."""
    if isinstance(src, bytes):
        if not src:
            raise ValueError("empty file")
        img = Image.open(io.BytesIO(src))
    else:
        if os.path.getsize(src) == 0:
            raise ValueError("empty file")
        img = _open_file(src)
    with img:
        img.load()
        return to_mode(img, channels)


RESIZE_MODES = ("crop", "pad")
RESIZE_HELP = ("how an image that is not square is fitted to the model's square input: 'crop' (default) "
               "resizes the short side and centre-crops the long one, so the top and bottom of tall images "
               "(the sides of wide ones) are cut off; 'pad' resizes the long side and letterboxes the short "
               "one by repeating the image's edge pixels, so nothing is cut")


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise UserError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def scale_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (small images are upscaled); unchanged if it is already."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return img.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else img


def resize_crop(img: Image.Image, size: int, generator: torch.Generator | None = None,
                augment: bool = False) -> Image.Image:
    """Resize the shorter side to ``size`` (small images are upscaled), then a center crop, or a random crop
    and a random horizontal flip when ``augment``."""
    img = scale_short_side(img, size)
    nw, nh = img.size
    if augment:
        left = int(torch.randint(nw - size + 1, (1,), generator=generator))
        top = int(torch.randint(nh - size + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
    else:
        left, top, flip = (nw - size) // 2, (nh - size) // 2, False
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def resize_pad(img: Image.Image, size: int, generator: torch.Generator | None = None,
               augment: bool = False) -> Image.Image:
    """Resize the longer side to ``size``, then letterbox: centre the image and fill the rest by repeating its
    edge pixels (nothing is cut). ``augment`` adds a random horizontal flip."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if (nw, nh) != (size, size):
        a = np.asarray(img)  # (nh, nw) or (nh, nw, 3)
        top, left = (size - nh) // 2, (size - nw) // 2
        pad = [(top, size - nh - top), (left, size - nw - left)] + [(0, 0)] * (a.ndim - 2)
        img = Image.fromarray(np.pad(a, pad, mode="edge"))  # uint8: L or RGB, as decoded
    if augment and bool(torch.rand(1, generator=generator) < 0.5):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def resize_image(img: Image.Image, size: int, mode: str = "crop", generator: torch.Generator | None = None,
                 augment: bool = False) -> Image.Image:
    """``img`` as a ``size`` x ``size`` image, by ``mode`` (see :data:`RESIZE_HELP`)."""
    fit = resize_pad if check_resize_mode(mode) == "pad" else resize_crop
    return fit(img, size, generator, augment)


def fit_image(img: Image.Image, size: int, mode: str = "crop") -> Image.Image:
    """The deterministic part of :func:`resize_image`, what an image cache can keep: for "crop" the image
    scaled to a short side of ``size`` (the crop, random when augmenting, comes later), for "pad" the
    letterboxed square. ``resize_image(fit_image(img, s, m), s, m, g, a)`` equals
    ``resize_image(img, s, m, g, a)`` pixel for pixel."""
    return resize_pad(img, size) if check_resize_mode(mode) == "pad" else scale_short_side(img, size)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (RGB or L) -> (C, H, W) float32 in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_image(src: str | os.PathLike | bytes, image_size: int, channels: int, augment: bool = False,
               generator: torch.Generator | None = None, resize_mode: str = "crop") -> torch.Tensor:
    """Decode one image file (path or bytes) into a (C, S, S) float tensor in [-1, 1], fitted to the square
    by ``resize_mode`` ("crop" or "pad", see :data:`RESIZE_HELP`); decoder errors propagate (datasets skip
    such files)."""
    img = decode_image(src, channels)
    return pil_to_tensor(resize_image(img, image_size, resize_mode, generator, augment))


def load_images(paths: Sequence[str | os.PathLike], channels: int, size: int,
                resize_mode: str = "crop") -> torch.Tensor:
    """Files -> (N, C, size, size) in [-1, 1]; a missing or unreadable file raises a UserError naming it."""
    check_resize_mode(resize_mode)
    out = []
    for p in map(Path, paths):
        try:
            out.append(load_image(p, size, channels, resize_mode=resize_mode))
            report_huge_images()
        except FileNotFoundError:
            raise UserError(f"{p} does not exist") from None
        except Exception as e:  # any decoder error
            raise UserError(f"{p} is not a readable image ({reason(e)}); remove it or convert it "
                            "to PNG/JPEG") from None
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- writing
def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] (clamped) -> PIL image, RGB for C = 3 and L for C = 1."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise UserError(f"expected an image tensor of shape (1 or 3, H, W), got {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)  # uint8 (H, W) -> L, (H, W, 3) -> RGB


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
