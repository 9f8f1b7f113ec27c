"""The IDX file format of (Fashion-)MNIST: a big-endian header, then raw uint8 arrays (optionally gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from rqvae.data.common import reason
from rqvae.errors import UserError

IMAGES_MAGIC = 2051  # idx3-ubyte: (N, rows, cols) uint8
LABELS_MAGIC = 2049  # idx1-ubyte: (N,) uint8


def read_idx(path: str | os.PathLike, magic: int = IMAGES_MAGIC) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as uint8: images (N, rows, cols) or labels (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        got, n = struct.unpack(">II", data[:8])
        if got != magic:
            raise ValueError(f"magic number {got}, expected {magic}")
        if magic == IMAGES_MAGIC:
            rows, cols = struct.unpack(">II", data[8:16])
            return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
        return np.frombuffer(data, np.uint8, offset=8).reshape(n)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a valid IDX file ({reason(e)}); re-download Fashion-MNIST") from None
