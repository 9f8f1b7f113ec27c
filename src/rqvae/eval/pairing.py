"""Whether an RQ-Transformer belongs to an RQ-VAE: it models that tokenizer's codes and embeds them with its
codebook. One check for ``rqvae sample``, ``rqvae serve`` and the codec."""

from __future__ import annotations

from typing import Any

import torch

from rqvae.errors import UserError


def check_pair(vae: Any, prior: Any | None, *, code_shape: tuple[int, int, int] | None = None) -> None:
    """UserError unless ``prior`` (an RQ-Transformer, or None: nothing to check) was trained on ``vae``'s
    codes: same depth, codebook size K, code width n_z and codebook (to 1e-5); and, when ``code_shape``
    (h, w, D) is given (the codec: ``vae.code_shape()``), the prior models code maps of that shape (sampling
    needs no such check: the convolutional decoder takes any map)."""
    if prior is None:
        return
    vc, c = vae.config, prior.config
    fix = "pass the RQ-VAE it was trained on (--vae)"
    if vc.depth != c.depth or vc.codebook_size != c.vocab_size or vc.embed_dim != c.embed_dim:
        raise UserError(f"the RQ-VAE (depth {vc.depth}, K {vc.codebook_size}, n_z {vc.embed_dim}) does not "
                        f"match the RQ-Transformer (depth {c.depth}, K {c.vocab_size}, n_z {c.embed_dim}); "
                        + fix)
    if code_shape is not None and tuple(code_shape) != tuple(c.code_shape):
        raise UserError(f"the RQ-VAE makes codes of shape {tuple(code_shape)} but the RQ-Transformer "
                        f"models {tuple(c.code_shape)}; {fix}")
    cb = vae.quantizer.codebook[0].detach().float().to(prior.codebook.device)  # (K, n_z)
    if not torch.allclose(cb, prior.codebook.float(), atol=1e-5):
        raise UserError("the RQ-VAE's codebook differs from the codebook stored in the RQ-Transformer; "
                        + fix)
