"""``rqvae codebook DIR --data SPEC [--count N] [-o OUT]``: the codebook doctor.

Per depth: codes used, dead codes, perplexity, the share of the most used code, and the norm of the residual
left after the first d codes (how much each depth still explains), as a table, ``OUT/codebook.json`` and
``OUT/codebook.png``. DIR is an RQ-VAE folder (or a training run holding ``model/``; official folders work
too). ``--soft-labels TAU ...`` adds, per temperature, how soft stage 2's targets would be (entropy, drawn
code = greedy code), to choose ``train-ar --temperature`` for this tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rqvae.data import build_image_dataset
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES
from rqvae.eval.codebook import codebook_report, format_report, plot_report
from rqvae.official.vae import load_rqvae


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model",
                        help="RQ-VAE folder, a train-vae run folder, or an official checkpoint folder")
    parser.add_argument("--data", required=True,
                        help="image folder, WebDataset shards, or 'fmnist[:DIR]' to measure the codes on")
    parser.add_argument("--split", default="test", help="dataset split (Fashion-MNIST: train or test)")
    parser.add_argument("--count", type=int, default=2000, help="images to encode (0: all)")
    parser.add_argument("-o", "--output", default=None, help="folder for codebook.json and codebook.png")
    parser.add_argument("--soft-labels", type=float, nargs="+", default=[], metavar="TAU",
                        help="also report stage 2's soft labels at these temperatures (train-ar "
                             "--temperature): target entropy and how often the drawn code is the greedy one, "
                             "per depth")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop", help=RESIZE_HELP)


def run(args: argparse.Namespace) -> int:

    vae = load_rqvae(args.model).eval()  # a run folder means RUN/model (from_pretrained resolves it)
    ds = build_image_dataset(args.data, vae.config.image_size, vae.config.in_channels, split=args.split,
                             resize_mode=args.resize_mode)
    report = codebook_report(vae, ds, count=args.count or None, temperatures=args.soft_labels)
    print(format_report(report))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "codebook.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_report(report, out / "codebook.png")
        print(f"wrote {out / 'codebook.json'} and {out / 'codebook.png'}")
    return 0
