"""A learned lossy image codec: RQ-VAE codes, range-coded with the RQ-Transformer as entropy model.

The RQ-VAE turns an image into codes (h, w, D); depth d <= D keeps the first d codes of every position
(a coarser image, a smaller file). The codes are coded in raster-then-depth order with the
RQ-Transformer's probabilities (the file size is the model's NLL of the codes), or, without a prior,
with per-depth adaptive frequencies. See :mod:`rqvae.codec.format` for the file and
:mod:`rqvae.codec.entropy` for the models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from rqvae.codec import format as rqv
from rqvae.codec.entropy import AdaptiveModel, Decoder, PriorModel, encode_symbols, nll_bits
from rqvae.errors import UserError
from rqvae.eval.pairing import check_pair


def model_hash(model: torch.nn.Module) -> bytes:
    """8 bytes of SHA-256 over the model's state dict (names, dtypes, shapes, values): its identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:8]


@dataclass
class Compressed:
    data: bytes  # the whole .rqv file
    header: rqv.RQVHeader
    nll_bits: float  # the entropy model's -log2 p(codes): the ideal payload size
    codes: np.ndarray  # (h, w, d) the coded codes


def _cond_tensor(prior: torch.nn.Module, cond: tuple[int, ...]) -> torch.Tensor | None:
    kind = prior.config.cond_type
    if kind == "uncond":
        return None
    t = torch.tensor(cond, dtype=torch.long)
    return t[None] if kind == "text" else t  # (1, L) or (1,)


def _cond_kind(prior: torch.nn.Module | None) -> str:
    if prior is None:
        return "none"
    return {"uncond": "none", "class": "class", "text": "text"}[prior.config.cond_type]


def _entropy_model(vae: torch.nn.Module, prior: torch.nn.Module | None, cond: tuple[int, ...], depth: int):
    if prior is None:
        return AdaptiveModel(vae.config.codebook_size, depth)
    return PriorModel(prior, _cond_tensor(prior, cond), depth)


def compress_codes(codes: torch.Tensor, vae: torch.nn.Module, prior: torch.nn.Module | None = None, *,
                   cond: tuple[int, ...] = (), depth: int | None = None) -> Compressed:
    """codes (h, w, D) of ``vae`` -> a ``.rqv`` file holding their first ``depth`` codes per position."""
    check_pair(vae, prior, code_shape=vae.code_shape())
    h, w, D = codes.shape
    depth = D if depth is None else depth
    if not 1 <= depth <= D:
        raise UserError(f"--depth must be between 1 and {D} (the tokenizer's depth), got {depth}")
    c = np.ascontiguousarray(codes[..., :depth].cpu().numpy().astype(np.int64))  # (h, w, d)
    flat = c.reshape(h * w, depth)
    probs = _entropy_model(vae, prior, cond, depth).encode_probs(flat)  # (T*d, K)
    symbols = flat.reshape(-1)
    payload = encode_symbols(symbols, probs)
    header = rqv.RQVHeader(channels=vae.config.in_channels, image_size=vae.config.image_size,
                           code_shape=(h, w, D), depth=depth, vae_hash=model_hash(vae),
                           prior_hash=model_hash(prior) if prior is not None else bytes(8),
                           cond_kind=_cond_kind(prior), cond=tuple(cond), codes_crc=rqv.codes_crc(c),
                           payload_len=len(payload))
    return Compressed(rqv.pack(header, payload), header, nll_bits(probs, symbols), c)


def decompress_codes(data: bytes, vae: torch.nn.Module, prior: torch.nn.Module | None = None,
                     name: str = "the file") -> tuple[np.ndarray, rqv.RQVHeader]:
    """A ``.rqv`` file -> its codes (h, w, d) and header; mismatched models and damage are UserErrors."""
    header, payload = rqv.unpack(data, name)
    if header.vae_hash != model_hash(vae):
        raise UserError(f"{name} was compressed with another RQ-VAE; pass the tokenizer it was made with")
    if header.has_prior and prior is None:
        raise UserError(f"{name} was compressed with an RQ-Transformer prior; pass it with --prior")
    if not header.has_prior:
        prior = None
    elif header.prior_hash != model_hash(prior):
        raise UserError(f"{name} was compressed with another RQ-Transformer; pass the prior it was made with")
    check_pair(vae, prior, code_shape=vae.code_shape())
    h, w, _ = header.code_shape
    try:
        flat = _entropy_model(vae, prior, header.cond, header.depth).decode(Decoder(payload), h * w,
                                                                            header.depth)
    except (ValueError, RuntimeError, AssertionError) as e:  # the range decoder's errors on bad data
        raise UserError(f"{name} could not be decoded ({e}); the file is damaged") from None
    codes = flat.reshape(h, w, header.depth)
    if rqv.codes_crc(codes) != header.codes_crc:
        raise UserError(f"{name}: the decoded codes fail their checksum: the file is damaged, or this "
                        "machine computes the prior differently (same torch version and CPU family needed)")
    return codes, header


def decode_image(vae: torch.nn.Module, codes: np.ndarray) -> torch.Tensor:
    """codes (h, w, d) -> image (C, S, S) in [-1, 1], from the first d codes of each position."""
    c = torch.as_tensor(codes, dtype=torch.long)[None]  # (1, h, w, d): the partial sum of d codes
    with torch.inference_mode():
        return vae.decode(c)[0].clamp(-1, 1)


def most_likely_class(codes: torch.Tensor, prior: torch.nn.Module, depth: int) -> int:
    """The class under which the prior gives the codes (h, w, D) the highest likelihood."""
    c = codes[..., :depth].cpu().numpy().astype(np.int64).reshape(-1, depth)
    best, best_bits = 0, float("inf")
    for k in range(prior.config.num_classes):
        probs = PriorModel(prior, torch.tensor([k]), depth).encode_probs(c)
        bits = nll_bits(probs, c.reshape(-1))
        if bits < best_bits:
            best, best_bits = k, bits
    return best
