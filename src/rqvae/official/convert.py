"""``convert_official``: an official checkpoint folder (RQ-VAE or RQ-Transformer) -> our model folder."""

from __future__ import annotations

import os
from pathlib import Path

from rqvae.errors import UserError
from rqvae.official.load import load_official
from rqvae.official.transformer import convert_official_rqtransformer, load_vae_codebook, needs_codebook
from rqvae.official.vae import convert_official_rqvae


def convert_official(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, weights: str = "auto",
                     vae_dir: str | os.PathLike | None = None) -> Path:
    """Convert an official checkpoint folder (RQ-VAE or RQ-Transformer) into our format in ``dst_dir``.

    An RQ-Transformer embeds codes with its RQ-VAE's codebook, which the official checkpoint does not
    hold: ``vae_dir`` names that RQ-VAE (our converted folder or the official one); when given, its codebook
    size per depth must equal the RQ-Transformer's.
    """
    state, arch = load_official(src_dir, weights)
    kind = arch.get("type")
    if kind == "rq-vae":
        model = convert_official_rqvae(state, arch)
    elif kind == "rq-transformer":
        if vae_dir is None and needs_codebook(arch):
            raise UserError(f"{src_dir} is an RQ-Transformer: pass --vae DIR, its RQ-VAE (official or "
                            "converted), whose codebook embeds the codes")
        codebook, sizes = load_vae_codebook(vae_dir) if vae_dir is not None else (None, None)
        if not needs_codebook(arch):  # learned embeddings need none
            codebook = None
        model = convert_official_rqtransformer(state, arch, codebook, vae_sizes=sizes)
    else:
        raise UserError(f"arch.type {kind!r} is not supported; expected 'rq-vae' or 'rq-transformer'")
    return model.save_pretrained(dst_dir)
