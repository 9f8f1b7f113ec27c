"""Codebook layout of :class:`rqvae.models.quantize.ResidualQuantizer`: per-depth sizes, and input checks.

Without a shared codebook each depth d may have its own size K_d (the official RQ-VAE's ``n_embed`` as a
list). The codebooks are stored padded to K = max_d K_d rows: rows K_d..K-1 of book d are padding that
quantization never chooses (their distance is +inf), that the EMA update never touches and that is never
restarted as a dead code.

Each depth's codebook may also have its own EMA decay (the official ``decay`` as a list): see
:func:`book_decays` and :func:`ema_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rqvae.errors import UserError


def book_sizes(codebook_size: int, depth: int, shared: bool,
               codebook_sizes: Sequence[int] | None) -> tuple[int, ...]:
    """Rows used by each codebook: (K,) for a shared codebook, (K_0, ..., K_{D-1}) per depth.

    ``codebook_sizes`` (one per depth, max = ``codebook_size``) or None (K for every depth)."""
    if codebook_sizes is None:
        return (codebook_size,) * (1 if shared else depth)
    sizes = tuple(int(k) for k in codebook_sizes)
    if len(sizes) != depth or min(sizes) < 1 or max(sizes) != codebook_size:
        raise UserError(f"codebook_sizes {list(sizes)} must give one size >= 1 per depth ({depth}) with "
                        f"the largest equal to codebook_size {codebook_size}")
    if shared and len(set(sizes)) > 1:
        raise UserError(f"codebook_sizes {list(sizes)} differ between depths, which needs one codebook per "
                        "depth: set shared_codebook false")
    return sizes[:1] if shared else sizes


def book_decays(ema_decay: float | Sequence[float], depth: int, shared: bool) -> tuple[float, ...]:
    """EMA decay of each codebook: ``ema_decay`` one number for all, or one per depth (not shared)."""
    many = isinstance(ema_decay, (list, tuple))
    decays = tuple(float(g) for g in ema_decay) if many else (float(ema_decay),) * depth
    if not all(0.0 <= g < 1.0 for g in decays):
        raise UserError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if len(decays) != depth:
        raise UserError(f"ema_decay {list(decays)} must give one decay per depth ({depth})")
    if shared and len(set(decays)) > 1:
        raise UserError(f"ema_decay {list(decays)} differs between depths, which needs one codebook per "
                        "depth: set shared_codebook false")
    return decays[:1] if shared else decays


def ema_(stat: Tensor, new: Tensor, decays: Sequence[float]) -> None:
    """In place ``stat[i] <- g_i stat[i] + (1 - g_i) new[i]``, ``g_i = decays[i]`` (one op when all equal)."""
    if len(set(decays)) == 1:
        stat.mul_(decays[0]).add_(new, alpha=1 - decays[0])
        return
    for s, x, g in zip(stat, new, decays, strict=True):
        s.mul_(g).add_(x, alpha=1 - g)


def valid_rows(sizes: Sequence[int], codebook_size: int) -> Tensor:
    """(n_books, K) bool: True for the rows a codebook uses, False for its padding rows."""
    return torch.arange(codebook_size) < torch.tensor(sizes)[:, None]


def code_norms(books: list[Tensor], valid: Tensor) -> list[Tensor]:
    """||e_k||^2 of each book's rows, (K,) per book, +inf for padding rows (never the nearest code)."""
    return [(b * b).sum(1).masked_fill(~valid[i], float("inf")) for i, b in enumerate(books)]


def check_vectors(z: Tensor, dim: int, name: str = "z") -> None:
    if not torch.is_tensor(z) or not z.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor (..., {dim}), got "
                        f"{getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() < 1 or z.shape[-1] != dim:
        raise UserError(f"{name} has shape {tuple(z.shape)}, but the quantizer expects the last "
                        f"dimension to be {dim}; move the channel axis last (channels-last)")


def check_codes(codes: Tensor, depth_sizes: Sequence[int]) -> None:
    """Integer codes (..., d) with d <= D and the codes of depth i in [0, K_i)."""
    if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex() \
            or codes.dtype == torch.bool:
        raise UserError(f"codes must be an integer tensor (..., depth), got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() < 1:
        raise UserError("codes must have a last dimension (the depth); got a scalar")
    depth = len(depth_sizes)
    if codes.shape[-1] > depth:
        raise UserError(f"codes have {codes.shape[-1]} depths but the quantizer has only "
                        f"{depth}; pass codes[..., :{depth}] or use a deeper quantizer")
    if codes.numel() == 0:
        return
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= max(depth_sizes):
        raise UserError(f"codes must lie in [0, {max(depth_sizes)}), found values in "
                        f"[{lo}, {hi}]; were they made with a different codebook size?")
    d = codes.shape[-1]
    sizes = torch.tensor(depth_sizes[:d], device=codes.device)
    if len(set(depth_sizes)) > 1 and bool((codes >= sizes).any()):
        raise UserError(f"codes of depth i must lie in [0, K_i) with K = {list(depth_sizes)} (a codebook "
                        "size per depth); were they made with a different RQ-VAE?")
