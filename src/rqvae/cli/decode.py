"""``rqvae decode codes.safetensors --model DIR -o out/ [--depth d]``: RQ codes -> PNG images.

Refuses codes whose codebook size, depth or spatial shape differ from the model's; warns when the codes
were made by a model with other weights (SHA-256 in the codes file's metadata).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from rqvae.cli.encode import load_model
from rqvae.data.images import save_image
from rqvae.errors import UserError
from rqvae.models.hub import weights_sha256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("codes", help="codes file written by `rqvae encode` (.safetensors, tensor 'codes')")
    parser.add_argument("--model", required=True,
                        help="RQ-VAE model folder (config.json + model.safetensors; a run folder means "
                             "RUN/model)")
    parser.add_argument("-o", "--output", required=True, help="folder for the decoded PNGs")
    parser.add_argument("--depth", type=int, default=None,
                        help="decode from the first d codes of each position only (coarse-to-fine)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def read_codes(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """-> (codes (N, h, w, D) int64, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a codes file written by `rqvae encode`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "codes" not in f.keys():
                raise UserError(f"{path} has no tensor 'codes'; pass a codes file written by `rqvae encode`")
            codes = f.get_tensor("codes")
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise UserError(f"{path} is not a safetensors codes file ({type(e).__name__}); "
                        "pass a file written by `rqvae encode`") from None
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise UserError(f"codes in {path} have dtype {codes.dtype}; expected integers")
    if codes.ndim != 4:
        raise UserError(f"codes in {path} have shape {tuple(codes.shape)}; expected (N, h, w, D)")
    return codes.long(), meta


def check_codes_match(codes: torch.Tensor, meta: dict[str, str], model, source: str) -> None:
    """UserError unless codes fit the model: K, depth, spatial shape and value range."""
    cfg = model.config
    K = meta.get("codebook_size")
    if K is not None and int(K) != cfg.codebook_size:
        raise UserError(f"{source} was made with a codebook of {K} codes but the model has "
                        f"{cfg.codebook_size}; decode with the model that encoded it")
    if codes.shape[-1] != cfg.depth:
        raise UserError(f"{source} has depth {codes.shape[-1]} but the model has depth {cfg.depth}; "
                        "decode with the model that encoded it")
    h, w, _ = model.code_shape()
    if tuple(codes.shape[1:3]) != (h, w):
        raise UserError(f"{source} has code maps of {tuple(codes.shape[1:3])} but the model makes {(h, w)}; "
                        "decode with the model that encoded it")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
        lo, hi = int(codes.min()), int(codes.max())
        raise UserError(f"{source} holds codes in [{lo}, {hi}], outside the model's "
                        f"codebook [0, {cfg.codebook_size - 1}]; decode with the model that encoded it")


def run(args: argparse.Namespace) -> int:

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    codes, meta = read_codes(args.codes)
    model, dev = load_model(args.model, args.device)
    check_codes_match(codes, meta, model, args.codes)
    if args.depth is not None and not 1 <= args.depth <= model.config.depth:
        raise UserError(f"--depth must be in 1..{model.config.depth}, got {args.depth}")
    sha = meta.get("model_sha256")
    if sha is not None and sha != weights_sha256(args.model):
        print(f"rqvae decode: warning: {args.codes} was encoded by other weights "
              f"(model {meta.get('model_name', meta.get('model_path'))!r}); "
              "the images will differ from the originals", file=sys.stderr)
    try:
        sources = json.loads(meta.get("sources", "[]"))
    except json.JSONDecodeError:
        sources = []
    names = [f"{i:05d}_{Path(sources[i]).stem}.png" if len(sources) == len(codes) else f"{i:05d}.png"
             for i in range(len(codes))]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for i in tqdm(range(0, len(codes), args.batch_size), desc="decode", unit="batch", disable=None):
            images = model.decode(codes[i:i + args.batch_size].to(dev), depth=args.depth)  # (B, C, H, W)
            for j, im in enumerate(images):
                save_image(im, out / names[i + j])
    print(f"wrote {len(codes)} images to {out}" + (f" (depth {args.depth})" if args.depth else ""))
    return 0
