"""Helpers the datasets share: the ``rqvae.data`` logger, seeded keys, argument checks, skip reports.

Bad data never stops a run: datasets skip undecodable files, record them in ``ds.skipped`` and log them
through the logger ``rqvae.data`` (:func:`log_skipped`); a source with no usable image raises
:class:`~rqvae.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from rqvae.errors import UserError

logger = logging.getLogger("rqvae.data")

Key = int | tuple[int, int]  # a dataset index, or (index, augmentation seed) from the loader


def split_key(key: Key) -> tuple[int, torch.Generator | None]:
    """A loader key -> (index, generator for the augmentations or None)."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None  # no seed: augmentations draw from torch's global RNG


def mix(*parts: Any) -> int:
    """A well-mixed 63-bit seed from any values (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def reason(e: BaseException) -> str:
    """A short one-line description of an exception, for skip lists and messages."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


def log_skipped(source: str, skipped: list[tuple[str, str]], total: int) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    logger.warning("skipped %d of %d files in %s: %s%s", len(skipped), total, source, shown, more)


def check_args(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
