"""The ``.rqv`` file: a small versioned header, then the range-coded codes.

Layout (little-endian)::

    offset  size  field
    0       4     magic b"RQV\\x00"
    4       1     format version (1)
    5       1     flags: bit 0 = coded with an RQ-Transformer prior
    6       1     image channels
    7       1     depth used d (codes per position in the file, 1..D)
    8       2     image size (the model's square input size)
    10      2     code height h
    12      2     code width w
    14      1     model depth D
    15      1     condition kind: 0 none, 1 class, 2 text
    16      2     condition length L (0, 1 or the text length)
    18      8     first 8 bytes of the VAE's content hash
    26      8     first 8 bytes of the prior's content hash (zeros without a prior)
    34      4     CRC-32 of the codes (h, w, d) as little-endian uint16
    38      4     payload length in bytes
    42      4*L   condition ids (uint32)
    ..      4     CRC-32 of every header byte before it
    ..      ...   payload: the range coder's 32-bit words

The checksums make a corrupted, truncated or foreign file a clear error instead of a wrong image.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from rqvae.errors import UserError

MAGIC = b"RQV\x00"
VERSION = 1
COND_KINDS = ("none", "class", "text")
_FIXED = struct.Struct("<4sBBBBHHHBBH8s8sII")  # everything up to the condition ids
FLAG_PRIOR = 1
HEADER_BYTES = _FIXED.size + 4  # without the condition ids (4 bytes each)


@dataclass(frozen=True)
class RQVHeader:
    channels: int
    image_size: int
    code_shape: tuple[int, int, int]  # (h, w, D) of the model
    depth: int  # codes per position stored in the file
    vae_hash: bytes  # 8 bytes
    prior_hash: bytes = bytes(8)  # 8 bytes; zeros: coded with the adaptive model, no prior
    cond_kind: str = "none"
    cond: tuple[int, ...] = ()  # class id, or text token ids
    codes_crc: int = 0
    payload_len: int = 0

    @property
    def has_prior(self) -> bool:
        return self.prior_hash != bytes(8)


def codes_crc(codes: np.ndarray) -> int:
    """CRC-32 of codes (h, w, d) as little-endian uint16 (K <= 65536)."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype="<u2").tobytes())


def pack(header: RQVHeader, payload: bytes) -> bytes:
    h, w, D = header.code_shape
    fixed = _FIXED.pack(MAGIC, VERSION, FLAG_PRIOR if header.has_prior else 0, header.channels, header.depth,
                        header.image_size, h, w, D, COND_KINDS.index(header.cond_kind), len(header.cond),
                        header.vae_hash, header.prior_hash, header.codes_crc, len(payload))
    head = fixed + np.asarray(header.cond, dtype="<u4").tobytes()
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack(data: bytes, name: str = "the file") -> tuple[RQVHeader, bytes]:
    """Parse and check a ``.rqv`` file; every problem is a one-line :class:`UserError`."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise UserError(f"{name} is not an .rqv file (no RQV signature); compress images with rqvae compress")
    if len(data) < _FIXED.size:
        raise UserError(f"{name} is truncated ({len(data)} bytes, shorter than its header)")
    (_, version, flags, channels, depth, size, h, w, D, kind, L, vae_hash, prior_hash, crc,
     payload_len) = _FIXED.unpack_from(data)
    if version != VERSION:
        raise UserError(f"{name} is .rqv format version {version}; this rqvae reads version {VERSION}: "
                        "upgrade rqvae or compress the image again")
    end = _FIXED.size + 4 * L
    if len(data) < end + 4:
        raise UserError(f"{name} is truncated inside its header")
    (head_crc,) = struct.unpack_from("<I", data, end)
    if zlib.crc32(data[:end]) != head_crc or kind >= len(COND_KINDS):
        raise UserError(f"{name} has a corrupt header (checksum mismatch)")
    payload = data[end + 4:]
    if len(payload) != payload_len:
        raise UserError(f"{name} is {'truncated' if len(payload) < payload_len else 'longer than written'}: "
                        f"payload of {len(payload)} bytes, the header says {payload_len}")
    cond = tuple(int(v) for v in np.frombuffer(data[_FIXED.size:end], dtype="<u4"))
    header = RQVHeader(channels=channels, image_size=size, code_shape=(h, w, D), depth=depth,
                       vae_hash=vae_hash, prior_hash=prior_hash, cond_kind=COND_KINDS[kind], cond=cond,
                       codes_crc=crc, payload_len=payload_len)
    if bool(flags & FLAG_PRIOR) != header.has_prior or not 1 <= depth <= D:
        raise UserError(f"{name} has an inconsistent header; the file is damaged")
    return header, payload
