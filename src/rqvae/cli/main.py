"""The ``rqvae`` command. Each subcommand lives in ``rqvae.cli.<module>`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when it is used."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from rqvae import __version__
from rqvae.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-vae": ("rqvae.cli.train_vae", "train an RQ-VAE tokenizer (stage 1)"),
    "encode": ("rqvae.cli.encode", "encode images into RQ codes"),
    "decode": ("rqvae.cli.decode", "decode RQ codes into images"),
    "reconstruct": ("rqvae.cli.reconstruct", "coarse-to-fine reconstructions (paper Fig. 5)"),
    "convert-official": ("rqvae.cli.convert_official", "convert an official checkpoint"),
    "train-ar": ("rqvae.cli.train_ar", "train an RQ-Transformer (stage 2)"),
    "sample": ("rqvae.cli.sample", "sample images from an RQ-Transformer"),
    "eval": ("rqvae.cli.eval", "FID, IS, rFID, PSNR/SSIM"),
    "train-classifier": ("rqvae.cli.train_classifier", "train a small classifier for evaluation"),
    "compress": ("rqvae.cli.compress", "compress images into .rqv files (RQ codes + entropy coding)"),
    "decompress": ("rqvae.cli.decompress", "decompress .rqv files into PNG images"),
    "info": ("rqvae.cli.info", "what a model, run or official checkpoint folder holds"),
    "codebook": ("rqvae.cli.codebook", "code usage, dead codes and residual norms per depth"),
    "serve": ("rqvae.cli.serve", "a local web app: generate, and see residual quantization at work"),
    "demo": ("rqvae.cli.demo", "the main job: train on Fashion-MNIST and write a report"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqvae",
        description="RQ-VAE and RQ-Transformer: autoregressive image generation using residual quantization.",
    )
    parser.add_argument("--version", action="version", version=f"rqvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # import only the command that runs
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"rqvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rqvae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
