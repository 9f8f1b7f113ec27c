"""``rqvae convert-official SRC_DIR DST_DIR``: an official (kakaobrain) checkpoint folder -> our format.

SRC_DIR holds ``model.pt`` and ``config.yaml``; ``arch.type`` picks the converter (rq-vae or
rq-transformer).  DST_DIR gets ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import argparse

from rqvae.official.load import WEIGHT_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC_DIR", help="official checkpoint folder (model.pt + config.yaml)")
    parser.add_argument("dst", metavar="DST_DIR", help="output model folder")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="auto: the EMA weights when the checkpoint has them; ema / raw: force one")
    parser.add_argument("--vae", metavar="VAE_DIR", default=None,
                        help="for an RQ-Transformer: its RQ-VAE folder (official or converted), whose "
                             "codebook embeds the codes (not needed when it learned its own code embeddings)")


def run(args: argparse.Namespace) -> int:
    from rqvae.official.convert import convert_official  # torch and the models: only when run

    out = convert_official(args.src, args.dst, weights=args.weights, vae_dir=args.vae)
    print(f"wrote {out}")
    return 0
