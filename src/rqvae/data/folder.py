"""Image folders: every image under a root (recursive), class labels from first-level sub-folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from rqvae.data.common import Key, check_args, log_skipped, logger, reason, split_key
from rqvae.data.decoded import DecodedImageCache, image_cache_enabled
from rqvae.data.images import (
    check_resize_mode,
    decode_image,
    load_image,
    pil_to_tensor,
    report_huge_images,
    resize_image,
)
from rqvae.errors import UserError

EAGER_SCAN_LIMIT = 20_000  # folders up to this many files are fully decoded once at construction


class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursive). Labels come from first-level sub-folders (sorted names -> ids);
    without sub-folders every image has label 0. If ``root/<split>`` exists and ``root`` holds only split
    folders (train/val/valid/validation/test), that split is used (``split_used``; None: all images of
    ``root``). ``resize_mode`` fits non-square images ("crop" or "pad", see ``rqvae.data.images``).

    Folders of up to ``eager_scan_limit`` files are decoded once at construction and bad files are
    dropped then; larger folders are checked lazily, and a file that fails later is replaced by the next
    usable one (and recorded in ``skipped`` in the process that saw it).

    ``cache`` (default: on unless ``$RQVAE_IMAGE_CACHE`` is 0): each image is decoded and resized once into
    the decoded-image cache (:mod:`rqvae.data.decoded`; the eager scan fills it) and read back small after
    that, in later epochs and later runs; augmentations apply on top, per epoch as without it. Files over
    PIL's pixel limit are named in one warning line per process."""

    accepts_seeded_keys = True

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, split: str = "train",
                 augment: bool = False, eager_scan_limit: int = EAGER_SCAN_LIMIT, resize_mode: str = "crop",
                 cache: bool | None = None):
        check_args(image_size, channels)
        self.resize_mode = check_resize_mode(resize_mode)
        self.decoded = DecodedImageCache(image_size, channels, resize_mode) \
            if (image_cache_enabled() if cache is None else cache) else None
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist or is not a folder")
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        split_names = {"train", "val", "valid", "validation", "test"}
        self.split_used: str | None = None
        if subdirs and set(subdirs) <= split_names and split in subdirs:
            root, self.split_used = root / split, split
            subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.root, self.image_size, self.channels, self.augment = root, image_size, channels, augment
        self.class_names = subdirs or [root.name or "images"]
        self.skipped: list[tuple[str, str]] = []

        files: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                if subdirs and not rel.parts:
                    self.skipped.append((path, "not inside a class sub-folder"))
                    continue
                files.append((path, subdirs.index(rel.parts[0]) if subdirs else 0))
        total = len(files) + len(self.skipped)

        self.lazy = len(files) > eager_scan_limit
        if self.lazy:
            exts = {e.lower() for e in Image.registered_extensions()}
            kept = []
            for path, label in files:
                if Path(path).suffix.lower() in exts:
                    kept.append((path, label))
                else:
                    self.skipped.append((path, "not an image file extension"))
            files = kept
        else:
            kept = []
            for path, label in files:
                try:
                    if self.decoded is not None:
                        self.decoded.prepare(path)
                    else:
                        decode_image(path, channels)
                    kept.append((path, label))
                except Exception as e:  # any decoder error: skip the file
                    self.skipped.append((path, reason(e)))
            files = kept
        self._report_huge()
        self.samples = files
        self._bad: set[int] = set()
        log_skipped(str(root), self.skipped, total)
        if not self.samples:
            shown = ", ".join(f"{Path(p).name}: {r}" for p, r in self.skipped[:3])
            raise UserError(f"no usable images in {root}: {len(self.skipped)} files skipped"
                            + (f" ({shown}{', ...' if len(self.skipped) > 3 else ''})" if shown else "")
                            + "; point --data at a folder of images")

    def _report_huge(self) -> None:
        report_huge_images("they are cached after the first decode" if self.decoded is not None else
                           "each epoch decodes them again (the decoded-image cache is off)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, generator = split_key(key)
        n = len(self.samples)
        for attempt in range(min(n, 100)):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                if self.decoded is not None:
                    image = pil_to_tensor(resize_image(self.decoded.load(path), self.image_size,
                                                       self.resize_mode, generator, self.augment))
                else:
                    image = load_image(path, self.image_size, self.channels, self.augment, generator,
                                       resize_mode=self.resize_mode)
                self._report_huge()
                return {"image": image, "label": label}
            except Exception as e:  # a file that went bad after the scan (or a lazy folder)
                self._bad.add(i)
                self.skipped.append((path, reason(e)))
                logger.warning("skipped %s (%s); using the next image instead", path, reason(e))
        raise UserError(f"no usable images near index {index} in {self.root}: 100 files in a row failed to "
                        "decode; check the folder")
