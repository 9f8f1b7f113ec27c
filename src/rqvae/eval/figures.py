"""Figures of a trained RQ-VAE: the coarse-to-fine reconstruction grid (paper Figure 5).

Used by the trainer's sample grids, ``rqvae demo`` and ``rqvae reconstruct``.  Images are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rqvae.data.images import make_grid


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
