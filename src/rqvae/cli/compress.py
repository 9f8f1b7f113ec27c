"""``rqvae compress IMAGES... --vae DIR [--prior AR_DIR] [--depth d] -o OUT``: one ``.rqv`` file per image.

Each image is fitted to the tokenizer's square input (``--resize-mode``: centre crop or letterbox),
encoded into RQ codes, and the first d codes of every position are range-coded: with the RQ-Transformer's
probabilities when ``--prior`` is given (the file size is then the model's NLL of the codes), else with
per-depth adaptive frequencies.
``rqvae decompress`` turns the files back into PNGs (with the same --vae / --prior).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rqvae.codec.codec import compress_codes, most_likely_class
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES, find_images, load_images
from rqvae.data.text import encode_texts, load_tokenizer
from rqvae.errors import UserError
from rqvae.models.hub import resolve_model_dir
from rqvae.models.transformer import RQTransformer
from rqvae.official.vae import load_rqvae


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or folders of images (fitted to the model's "
                                                  "square input by --resize-mode)")
    parser.add_argument("--vae", required=True, help="RQ-VAE model folder (the tokenizer; a run folder means "
                                                     "RUN/model)")
    parser.add_argument("--prior", default=None,
                        help="RQ-Transformer folder (or run) trained on this VAE's codes (the entropy "
                             "model); default: adaptive per-depth frequencies")
    parser.add_argument("--depth", type=int, default=None,
                        help="codes per position to keep (1..D; default D): fewer = smaller and coarser")
    parser.add_argument("--class", dest="cls", type=int, default=None,
                        help="class-conditional priors: the class to code under (default: the most likely)")
    parser.add_argument("--prompt", default=None, help="text-conditional priors: the caption to code under")
    parser.add_argument("-o", "--output", required=True, help="folder for the .rqv files")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop", help=RESIZE_HELP)


def load_models(vae_dir: str, prior_dir: str | None):
    """(vae, prior or None) on the CPU in eval mode: the codec's reference arithmetic is fp32 on the CPU.
    Run folders mean their ``model/`` (from_pretrained resolves them)."""
    vae = load_rqvae(vae_dir).eval()
    prior = RQTransformer.from_pretrained(prior_dir).eval() if prior_dir else None
    return vae, prior


def _condition(prior, args: argparse.Namespace, codes: torch.Tensor, depth: int) -> tuple[int, ...]:

    kind = "none" if prior is None else prior.config.cond_type
    if kind == "class":
        if args.prompt is not None:
            raise UserError("this prior is class-conditional; use --class ID, not --prompt")
        if args.cls is None:
            return (most_likely_class(codes, prior, depth),)
        if not 0 <= args.cls < prior.config.num_classes:
            raise UserError(f"--class {args.cls} is out of range; the prior has classes "
                            f"0..{prior.config.num_classes - 1}")
        return (args.cls,)
    if kind == "text":
        if args.prompt is None:
            raise UserError("this prior is text-conditional; pass --prompt \"a caption\"")

        tok = load_tokenizer(resolve_model_dir(args.prior), max_len=prior.config.cond_len)
        return tuple(int(v) for v in encode_texts(tok, [args.prompt])[0])
    if args.cls is not None or args.prompt is not None:
        raise UserError("--class and --prompt need a conditional --prior")
    return ()


def run(args: argparse.Namespace) -> int:

    files = find_images(args.images)
    out = Path(args.output)
    if out.is_file():
        raise UserError(f"{out} is a file; -o takes a folder for the .rqv files")
    vae, prior = load_models(args.vae, args.prior)
    D = vae.config.depth
    if args.depth is not None and not 1 <= args.depth <= D:
        raise UserError(f"--depth must be between 1 and {D} (the tokenizer's depth), got {args.depth}")
    depth = args.depth or D
    out.mkdir(parents=True, exist_ok=True)
    total, pixels = 0, 0
    for f in files:
        x = load_images([f], vae.config.in_channels, vae.config.image_size, args.resize_mode)  # (1, C, S, S)
        with torch.inference_mode():
            codes = vae.encode(x)[0]  # (h, w, D)
        result = compress_codes(codes, vae, prior, cond=_condition(prior, args, codes, depth), depth=depth)
        (out / f"{f.stem}.rqv").write_bytes(result.data)
        total += len(result.data)
        pixels += x.shape[-1] * x.shape[-2]
    print(f"compressed {len(files)} image(s) to {out}: {total} bytes, {8 * total / pixels:.3f} bits per "
          f"pixel at {vae.config.image_size}x{vae.config.image_size}, depth {depth} of {D}")
    return 0
