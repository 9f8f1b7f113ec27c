"""``rqvae reconstruct IMAGES... --model DIR --depths 1,2,3,4 -o fig.png``: the paper's Figure 5.

One row per image: the original in the first column, then the reconstructions G(sum_{i<=d} e(k_i)) from the
first d codes of each position, for each requested d (coarse-to-fine).  A header row names the columns
(``input, d=1, d=2, ...``) and each row is labelled with its file name (``--no-labels``: the bare grid).
Prints the PSNR per depth.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from rqvae.cli.encode import add_image_and_model_arguments, load_model
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES, find_images, load_images, save_image
from rqvae.errors import UserError
from rqvae.eval.figures import coarse_to_fine, labelled_coarse_to_fine, tile_coarse_to_fine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_and_model_arguments(parser)
    parser.add_argument("--depths", default=None,
                        help="comma-separated code depths, e.g. 1,2,3,4 (default: all)")
    parser.add_argument("-o", "--output", required=True, help="PNG file for the grid")
    parser.add_argument("--max-images", type=int, default=8, help="use at most this many images (rows)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop", help=RESIZE_HELP)
    parser.add_argument("--no-labels", action="store_true",
                        help="no header row (input, d=1, ...) and no file names on the rows")


def parse_depths(text: str | None, max_depth: int) -> list[int]:
    if text is None:
        return list(range(1, max_depth + 1))
    try:
        depths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--depths must be comma-separated integers such as 1,2,3,4, got {text!r}") from None
    bad = [d for d in depths if not 1 <= d <= max_depth]
    if not depths or bad:
        raise UserError(f"--depths must be in 1..{max_depth} (the model's code depth), got {text!r}")
    return depths


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], on the [0, 1] scale, averaged over the batch."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def run(args: argparse.Namespace) -> int:

    if args.max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {args.max_images}")
    files = find_images(args.images)[: args.max_images]
    model, dev = load_model(args.model, args.device)
    cfg = model.config
    depths = parse_depths(args.depths, cfg.depth)
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"{out} is a folder; -o takes a file name such as fig.png")
    x = load_images(files, cfg.in_channels, cfg.image_size, args.resize_mode).to(dev)  # (N, C, H, W)
    recons = coarse_to_fine(model, x, depths)  # each (N, C, H, W)
    if args.no_labels:
        grid = tile_coarse_to_fine(x, recons, one_row_per_image=True)
    else:
        grid = labelled_coarse_to_fine(x, recons, depths, image_labels=[f.name for f in files],
                                       one_row_per_image=True)
    save_image(grid, out)
    print(f"wrote {out}: {len(files)} rows x (original + depths {','.join(map(str, depths))})")
    for d, r in zip(depths, recons):
        p = psnr(x, r)
        print(f"  depth {d}: PSNR {p:.2f} dB" if math.isfinite(p) else f"  depth {d}: PSNR inf")
    return 0
