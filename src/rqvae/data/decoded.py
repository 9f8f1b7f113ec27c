"""The decoded-image cache: each image file of a folder decoded and resized once, then read back small.

An entry is one uint8 ``.npy`` array (H, W) or (H, W, 3) under ``cache_dir("images")``: the image after
:func:`~rqvae.data.images.fit_image` (for "crop" the short side scaled to the image size, the long side kept,
so that random crops and flips still happen per epoch on top of it; for "pad" the letterboxed square). Its
name is a hash of the file (absolute path, size, mtime, inode), the options (image size, channels, resize
mode) and the Pillow version, so an edited file gets a new entry and the stale one is never read. Entries are
written to a temporary name and renamed into place, so concurrent runs and DDP ranks never see half a file
(at worst two processes decode the same image once each). ``RQVAE_IMAGE_CACHE=0`` turns the cache off;
delete ``$RQVAE_CACHE/images`` to reclaim the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from rqvae.data.cache import cache_dir
from rqvae.data.common import logger, reason
from rqvae.data.images import check_resize_mode, decode_image, fit_image

CACHE_ENV = "RQVAE_IMAGE_CACHE"
FORMAT_VERSION = 1  # bump when decode_image / fit_image change their pixels
IMAGE_CACHE_HELP = ("image folders are decoded and resized once into a cache ($RQVAE_CACHE/images, "
                    "else ~/.cache/rqvae/images; an edited file is decoded again); RQVAE_IMAGE_CACHE=0 turns "
                    "it off")


def image_cache_enabled() -> bool:
    """False when ``$RQVAE_IMAGE_CACHE`` is 0 / off / false / no."""
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class DecodedImageCache:
    """Fitted images of ``image_size`` x ``channels`` by ``resize_mode`` for image files, decoded at most once
    per file version (see the module doc). Holds only its options, so it travels to loader workers as is."""

    def __init__(self, image_size: int, channels: int, resize_mode: str = "crop",
                 root: str | os.PathLike | None = None):
        self.image_size, self.channels = image_size, channels
        self.resize_mode = check_resize_mode(resize_mode)
        self.root = cache_dir("images", root)
        self._write_failed = False

    def entry(self, path: str | os.PathLike) -> Path:
        """The cache file for the current version of ``path`` (raises OSError when ``path`` is gone)."""
        st = os.stat(path)
        key = f"v{FORMAT_VERSION}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0" \
              f"{self.image_size}\0{self.channels}\0{self.resize_mode}\0{PIL.__version__}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def prepare(self, path: str | os.PathLike) -> None:
        """Make sure ``path`` has an entry: decode it unless one exists (decoder errors propagate)."""
        if not self.entry(path).is_file():
            self.load(path)

    def load(self, path: str | os.PathLike) -> Image.Image:
        """The fitted image of ``path``: read from its entry, or decoded, fitted and stored."""
        entry = self.entry(path)
        try:
            a = np.load(entry, allow_pickle=False)
            if a.dtype == np.uint8 and a.ndim == (2 if self.channels == 1 else 3):
                return Image.fromarray(a)  # (H, W) -> L, (H, W, 3) -> RGB
        except (OSError, ValueError, EOFError):  # no entry yet (or an unreadable one: written again below)
            pass
        img = fit_image(decode_image(path, self.channels), self.image_size, self.resize_mode)
        self._store(entry, np.asarray(img))
        return img

    def _store(self, entry: Path, a: np.ndarray) -> None:
        """Write atomically (temporary file, then rename); a cache that cannot be written is only logged."""
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, a, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._write_failed:
                self._write_failed = True
                logger.warning("cannot write the decoded-image cache in %s (%s); images are decoded every "
                               "time; set RQVAE_CACHE to a writable folder or %s=0", self.root, reason(e),
                               CACHE_ENV)
