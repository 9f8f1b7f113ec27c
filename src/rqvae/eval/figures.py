"""Figures of a trained RQ-VAE: the coarse-to-fine reconstruction grid (paper Figure 5), and labels on
image grids (:func:`label_grid`: a header row naming the columns, a label left of each row).

Used by the trainer's sample grids, ``rqvae demo`` and ``rqvae reconstruct``.  Images are in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from rqvae.data.images import make_grid, pil_to_tensor, tensor_to_pil

MAX_LABEL_CHARS = 24  # longer row / column labels (file names) are shortened with "..."


def coarse_to_fine(vae: Any, images: torch.Tensor, depths: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Reconstructions G(sum_{i<=d} e(k_i)) from the first d codes, one (B, C, H, W) tensor in [-1, 1] per
    d in ``depths`` (default 1..D), on the images' device.  ``vae``'s train/eval mode is restored after."""
    depths = list(range(1, vae.config.depth + 1)) if depths is None else list(depths)
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            codes = vae.encode(images)  # (B, h, w, D)
            return [vae.decode(codes, depth=d).float().clamp(-1, 1) for d in depths]  # each (B, C, H, W)
    finally:
        vae.train(was_training)


def tile_coarse_to_fine(images: torch.Tensor, recons: Sequence[torch.Tensor], *,
                        one_row_per_image: bool = False) -> torch.Tensor:
    """Tile originals and their reconstructions into one (C, H', W') grid on the CPU.

    Default: the first row holds the originals, row d + 1 the reconstructions of the d-th depth.
    ``one_row_per_image``: transposed, the original in the first column and one column per depth.
    """
    cells = torch.stack([images.float().clamp(-1, 1), *recons])  # (1 + n_depths, B, C, H, W)
    if one_row_per_image:
        cells = cells.transpose(0, 1)  # (B, 1 + n_depths, C, H, W)
    return make_grid(cells.flatten(0, 1).cpu(), nrow=cells.shape[1])


def coarse_to_fine_grid(vae: Any, images: torch.Tensor, depths: Sequence[int] | None = None, *,
                        one_row_per_image: bool = False) -> torch.Tensor:
    """Paper Figure 5 as a (C, H', W') tensor in [-1, 1]: rows are the originals, then the reconstructions
    from the first d codes, d = 1..D (or the given ``depths``).  ``vae``'s train/eval mode is restored."""
    recons = coarse_to_fine(vae, images, depths)
    return tile_coarse_to_fine(images, recons, one_row_per_image=one_row_per_image)


def depth_labels(depths: Sequence[int]) -> list[str]:
    """The column (or row) names of a coarse-to-fine figure: ``input, d=1, d=2, ...``."""
    return ["input", *(f"d={d}" for d in depths)]


def _short(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 3] + "..."


def _text_size(font: Any, text: str) -> tuple[int, int]:
    """(right, bottom) of ``text`` drawn at (0, 0)."""
    return tuple(font.getbbox(text)[2:]) if text else (0, 0)  # type: ignore[return-value]


def label_grid(grid: torch.Tensor, col_labels: Sequence[str] = (), row_labels: Sequence[str] = (), *,
               padding: int = 2) -> torch.Tensor:
    """A grid from :func:`~rqvae.data.images.make_grid` (C, H, W) in [-1, 1] with ``len(col_labels)``
    columns and ``len(row_labels)`` rows (either may be empty: no header / no row labels), returned with a
    header row naming each column and each row's label on its left, in black on white (PIL's default font).
    Grids whose cells are narrower than their labels are first enlarged by an integer factor (nearest)."""
    cols, rows = [_short(t) for t in col_labels], [_short(t) for t in row_labels]
    if not cols and not rows:
        return grid
    c, h, w = grid.shape
    ncol = len(cols) or 1
    nrow = len(rows) or 1
    cell_w, cell_h = (w - padding) / ncol - padding, (h - padding) / nrow - padding
    font = ImageFont.load_default()
    text_w = max((_text_size(font, t)[0] for t in cols), default=0)
    text_h = max(_text_size(font, t)[1] for t in [*cols, *rows, "Ag"])
    scale = max(1, math.ceil((text_w + 4) / max(cell_w, 1)) if cols else 1,
                math.ceil((text_h + 2) / max(cell_h, 1)) if rows else 1)
    scale = min(scale, 8)
    img = tensor_to_pil(grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    top = text_h + 6 if cols else 0
    left = max(_text_size(font, t)[0] for t in rows) + 8 if rows else 0
    canvas = Image.new(img.mode, (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if img.mode == "L" else (0, 0, 0)
    step_x, step_y = (img.width - padding * scale) / ncol, (img.height - padding * scale) / nrow
    for i, t in enumerate(cols):
        x = left + padding * scale + i * step_x + (step_x - padding * scale - _text_size(font, t)[0]) / 2
        draw.text((x, 2), t, fill=ink, font=font)
    for j, t in enumerate(rows):
        y = top + padding * scale + j * step_y + (step_y - padding * scale - text_h) / 2
        draw.text((4, y), t, fill=ink, font=font)
    return pil_to_tensor(canvas)


def labelled_coarse_to_fine(images: torch.Tensor, recons: Sequence[torch.Tensor], depths: Sequence[int], *,
                            image_labels: Sequence[str] = (), one_row_per_image: bool = False
                            ) -> torch.Tensor:
    """:func:`tile_coarse_to_fine` with labels: the depths (``input, d=1, ...``) name the columns when
    ``one_row_per_image`` (else the rows), and ``image_labels`` (e.g. file names) name the images."""
    grid = tile_coarse_to_fine(images, recons, one_row_per_image=one_row_per_image)
    names = depth_labels(depths)
    if one_row_per_image:
        return label_grid(grid, names, image_labels)
    return label_grid(grid, image_labels, names)


def labelled_coarse_to_fine_grid(vae: Any, images: torch.Tensor, depths: Sequence[int] | None = None, *,
                                 image_labels: Sequence[str] = (), one_row_per_image: bool = False
                                 ) -> torch.Tensor:
    """:func:`coarse_to_fine_grid` with the depths and ``image_labels`` written on it."""
    depths = list(range(1, vae.config.depth + 1)) if depths is None else list(depths)
    recons = coarse_to_fine(vae, images, depths)
    return labelled_coarse_to_fine(images, recons, depths, image_labels=image_labels,
                                   one_row_per_image=one_row_per_image)
