"""``rqvae encode IMAGES... --model DIR -o codes.safetensors``: images -> RQ codes (N, h, w, D) int64.

The codes file is safetensors with one tensor ``codes`` and metadata naming the model (path and SHA-256 of
its weights), the code shape, K and the source files, so that ``rqvae decode`` can refuse mismatched codes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rqvae.data.images import RESIZE_HELP, RESIZE_MODES, find_images, load_images
from rqvae.errors import UserError
from rqvae.models.hub import atomic_save_safetensors, resolve_model_dir, weights_sha256
from rqvae.models.vae import RQVAE

CODES_FORMAT = "rqvae-codes/1"


def add_image_and_model_arguments(parser: argparse.ArgumentParser) -> None:
    """IMAGES... and --model: what the commands that run a tokenizer on images share."""
    parser.add_argument("images", nargs="+", help="image files or folders of images (fitted to the model's "
                                                  "square input by --resize-mode)")
    parser.add_argument("--model", required=True,
                        help="RQ-VAE model folder (config.json + model.safetensors; a run folder means "
                             "RUN/model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_and_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="codes file to write (.safetensors)")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop", help=RESIZE_HELP)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _relative(file: Path, inputs: list[str]) -> str:
    """The file's path relative to the input folder it was found in (its name for a file given directly):
    codes files name their sources without absolute paths."""
    for root in map(Path, inputs):
        if root.is_dir() and file.resolve().is_relative_to(root.resolve()):
            return file.resolve().relative_to(root.resolve()).as_posix()
    return file.name


def load_model(model_dir: str, device: str):

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    return RQVAE.from_pretrained(model_dir).to(dev).eval(), dev


def run(args: argparse.Namespace) -> int:

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"{out} is a folder; -o takes a file name such as codes.safetensors")
    files = find_images(args.images)
    model, dev = load_model(args.model, args.device)
    cfg = model.config
    codes = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(files), args.batch_size), desc="encode", unit="batch", disable=None):
            x = load_images(files[i:i + args.batch_size], cfg.in_channels, cfg.image_size,
                            args.resize_mode).to(dev)
            codes.append(model.encode(x).to("cpu", torch.int64))  # (B, h, w, D)
    codes_t = torch.cat(codes)  # (N, h, w, D)
    meta = {
        "format": CODES_FORMAT,
        "code_shape": json.dumps(list(codes_t.shape[1:])),
        "codebook_size": str(cfg.codebook_size),
        "depth": str(cfg.depth),
        "image_size": str(cfg.image_size),
        "in_channels": str(cfg.in_channels),
        "model_name": Path(args.model).resolve().name,  # a name for messages; no absolute path is stored
        "model_sha256": weights_sha256(resolve_model_dir(args.model)),
        "sources": json.dumps([_relative(f, args.images) for f in files]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({"codes": codes_t.contiguous()}, out, metadata=meta)
    print(f"wrote {out}: {len(files)} images -> codes {tuple(codes_t.shape)} (K={cfg.codebook_size})")
    return 0
