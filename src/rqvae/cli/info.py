"""``rqvae info DIR [--json]``: what a folder holds (stage, config, parameters, code shape, codebook size,
training steps and data, last training / validation metrics), for our model folders, training runs and
official checkpoint folders (model.pt + config.yaml)."""

from __future__ import annotations

import argparse
import json

from rqvae.eval.model_info import describe, format_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+",
                        help="model folders, training runs or official checkpoint folders")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per folder, a list)")


def run(args: argparse.Namespace) -> int:

    infos = [describe(p) for p in args.paths]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2, default=str))
    else:
        print("\n\n".join(format_info(i) for i in infos))
    return 0
