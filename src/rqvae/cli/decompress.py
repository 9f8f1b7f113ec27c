"""``rqvae decompress FILES... --vae DIR [--prior AR_DIR] -o DIR``: ``.rqv`` files back to PNG images.

The models must be the ones the files were compressed with (their hashes are in each file's header).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rqvae.cli.compress import load_models
from rqvae.codec.codec import decode_image, decompress_codes
from rqvae.data.images import save_image
from rqvae.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help=".rqv files or folders of them")
    parser.add_argument("--vae", required=True,
                        help="the RQ-VAE folder the files were compressed with (a run folder means "
                             "RUN/model)")
    parser.add_argument("--prior", default=None, help="the RQ-Transformer folder (or run), if one was used")
    parser.add_argument("-o", "--output", required=True, help="folder for the PNGs")


def _find(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.glob("*.rqv"))
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p} does not exist; pass .rqv files or folders of them")
    if not found:
        raise UserError(f"no .rqv files in {', '.join(paths)}")
    return found


def run(args: argparse.Namespace) -> int:

    files = _find(args.files)
    vae, prior = load_models(args.vae, args.prior)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        codes, _ = decompress_codes(f.read_bytes(), vae, prior, name=str(f))
        save_image(decode_image(vae, codes), out / f"{f.stem}.png")
    print(f"decompressed {len(files)} file(s) to {out}")
    return 0
