"""Image datasets and a deterministic, resumable loader.

Three sources, one sample format ``{"image": FloatTensor (C, S, S) in [-1, 1], "label": int}``:

- an image folder (recursive; any format PIL reads; class labels from first-level sub-folders),
- WebDataset ``.tar`` shards, streamed (for data that outgrows a folder),
- Fashion-MNIST IDX files (``fmnist`` or ``fmnist:/dir``).

Bad data never stops a run: truncated, empty or non-image files are skipped, listed in ``ds.skipped`` and
logged (logger ``rqvae.data``); a source with no usable image at all raises :class:`UserError`.

The loader's order is a function of ``(seed, epoch)`` only. Each rank takes its own shard of every epoch (like
``DistributedSampler``), and a loader can start at any step, so a resumed run sees exactly the batches that
the interrupted run would have seen next. Augmentations draw from a seed that the loader derives from
``(seed, epoch, position)``, so they too are identical after a resume and whatever ``num_workers`` is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import math
import os
import random
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rqvae.errors import UserError

logger = logging.getLogger("rqvae.data")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
WDS_LABEL_KEYS = ("cls", "label", "txt")
EAGER_SCAN_LIMIT = 20_000  # folders up to this many files are fully decoded once at construction

Key = int | tuple[int, int]  # a dataset index, or (index, augmentation seed) from the loader


# ----------------------------------------------------------------------------------------------------------
# image decoding and preprocessing

def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (channels=3). Transparency is composited on white,
    16/32-bit integer images are scaled to 8 bit, EXIF orientation is applied."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF: keep the pixels as stored
        pass
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I (32-bit int), F (float)
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _resize_crop(img: Image.Image, size: int, generator: torch.Generator | None,
                 augment: bool) -> Image.Image:
    """Resize the shorter side to ``size`` (small images are upscaled), then a center crop, or a random crop
    and a random horizontal flip when ``augment``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if augment:
        left = int(torch.randint(nw - size + 1, (1,), generator=generator))
        top = int(torch.randint(nh - size + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
    else:
        left, top, flip = (nw - size) // 2, (nh - size) // 2, False
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (S, S) or (S, S, 3)
    arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)  # (C, S, S)
    return arr.float().div_(127.5).sub_(1.0)


def _open_image(src: str | os.PathLike | bytes, channels: int) -> Image.Image:
    """Open, fully decode (so truncated files fail here, not later) and convert the mode."""
    if isinstance(src, bytes):
        if not src:
            raise ValueError("empty file")
        img = Image.open(io.BytesIO(src))
    else:
        if os.path.getsize(src) == 0:
            raise ValueError("empty file")
        img = Image.open(src)
    with img:
        img.load()
        return _to_mode(img, channels)


def load_image(src: str | os.PathLike | bytes, image_size: int, channels: int, augment: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode one image file (path or bytes) into a (C, S, S) float tensor in [-1, 1]."""
    img = _open_image(src, channels)
    return _to_tensor(_resize_crop(img, image_size, generator, augment))


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


def _split_key(key: Key) -> tuple[int, torch.Generator | None]:
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None  # no seed: augmentations draw from torch's global RNG


def _log_skipped(source: str, skipped: list[tuple[str, str]], total: int) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    logger.warning("skipped %d of %d files in %s: %s%s", len(skipped), total, source, shown, more)


def _check_args(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


# ----------------------------------------------------------------------------------------------------------
# in-memory datasets: small tensors and Fashion-MNIST

class TensorImageDataset(Dataset):
    """Small in-memory images (tests, demos) as one tensor, uint8 in [0, 255] or float in [-1, 1],
    shape (N, C, S, S); labels (N,) default to 0.

    ``augment`` flips horizontally at random. ``ds[[k1, k2, ...]]``-style batched access
    (``__getitems__``) returns an already batched dict, which keeps the loader fast."""

    accepts_seeded_keys = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None, channels: int | None = None,
                 augment: bool = False):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise UserError(f"images must be a (N, C, H, W) tensor with C = 1 or 3, got {shape}")
        if images.shape[0] == 0:
            raise UserError("no usable images: the image tensor is empty")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise UserError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
        self.images = images  # (N, C, H, W)
        n = images.shape[0]
        labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise UserError(f"labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
        if labels.numel() and labels.min() < 0:
            raise UserError("labels must be non-negative class ids")
        self.labels = labels
        n_cls = int(labels.max()) + 1 if n else 1
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_cls)]
        if len(self.class_names) < n_cls:
            raise UserError(f"{len(self.class_names)} class names for labels up to {n_cls - 1}")
        self.channels = channels or images.shape[1]
        if self.channels not in (1, 3) or (images.shape[1] == 3 and self.channels == 1):
            raise UserError(f"cannot serve {images.shape[1]}-channel images as {self.channels} channels")
        self.augment = augment
        self.skipped: list[tuple[str, str]] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _batch(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        split = [_split_key(k) for k in keys]
        idx = torch.tensor([i for i, _ in split], dtype=torch.long)
        x = self.images[idx]  # (B, C, S, S)
        x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float().clone()
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        if self.augment:
            flip = torch.stack([torch.rand((), generator=g) < 0.5 for _, g in split])  # (B,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return {"image": x, "label": self.labels[idx]}

    def __getitem__(self, key: Key) -> dict[str, Any]:
        b = self._batch([key])
        return {"image": b["image"][0], "label": int(b["label"][0])}

    def __getitems__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        return self._batch(keys)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        got, n = struct.unpack(">II", data[:8])
        if got != magic:
            raise ValueError(f"magic number {got}, expected {magic}")
        if magic == 2051:
            rows, cols = struct.unpack(">II", data[8:16])
            arr = np.frombuffer(data, np.uint8, offset=16)
            return arr.reshape(n, rows, cols)
        return np.frombuffer(data, np.uint8, offset=8).reshape(n)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a valid IDX file ({_reason(e)}); re-download Fashion-MNIST") from None


class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST from its IDX files (``train-*`` 60k images, ``t10k-*`` 10k images), 28x28 grayscale.

    For ``image_size > 28`` the images are zero-padded (background -1) to the size, centered; for smaller
    sizes they are resized (bilinear, antialiased). ``augment`` flips horizontally at random."""

    def __init__(self, root: str | os.PathLike = FMNIST_DIR, image_size: int = 32, channels: int = 1,
                 split: str = "train", augment: bool = False):
        _check_args(image_size, channels)
        root = Path(root)
        prefix = {"train": "train", "test": "t10k", "t10k": "t10k", "val": "t10k"}.get(split)
        if prefix is None:
            raise UserError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        files = {}
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise UserError(f"Fashion-MNIST file {cands[0]} not found; install the Debian package "
                                "dataset-fashion-mnist (make data) or pass fmnist:/dir/with/idx/files")
            files[kind] = found
        images = _read_idx(files["images-idx3-ubyte"], 2051)
        labels = _read_idx(files["labels-idx1-ubyte"], 2049)
        if len(images) != len(labels):
            raise UserError(f"{files['images-idx3-ubyte']} has {len(images)} images but "
                            f"{files['labels-idx1-ubyte']} has {len(labels)} labels; re-download the files")
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        h, w = x.shape[-2:]
        if image_size >= max(h, w):  # pad (0 -> -1 background), centered
            top, left = (image_size - h) // 2, (image_size - w) // 2
            x = F.pad(x, (left, image_size - w - left, top, image_size - h - top))
        else:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        super().__init__(x, torch.from_numpy(labels.astype(np.int64)), FMNIST_CLASSES, channels=channels,
                         augment=augment)
        self.root = root
        self.split = split


# ----------------------------------------------------------------------------------------------------------
# image folders

class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursive). Labels come from first-level sub-folders (sorted names -> ids);
    without sub-folders every image has label 0. If ``root/<split>`` exists and ``root`` holds only split
    folders (train/val/valid/validation/test), that split is used.

    Folders of up to ``eager_scan_limit`` files are decoded once at construction and bad files are
    dropped then; larger folders are checked lazily, and a file that fails later is replaced by the next
    usable one (and recorded in ``skipped`` in the process that saw it)."""

    accepts_seeded_keys = True

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, split: str = "train",
                 augment: bool = False, eager_scan_limit: int = EAGER_SCAN_LIMIT):
        _check_args(image_size, channels)
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist or is not a folder")
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        split_names = {"train", "val", "valid", "validation", "test"}
        if subdirs and set(subdirs) <= split_names and split in subdirs:
            root = root / split
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
                    _open_image(path, channels)
                    kept.append((path, label))
                except Exception as e:  # any decoder error: skip the file
                    self.skipped.append((path, _reason(e)))
            files = kept
        self.samples = files
        self._bad: set[int] = set()
        _log_skipped(str(root), self.skipped, total)
        if not self.samples:
            shown = ", ".join(f"{Path(p).name}: {r}" for p, r in self.skipped[:3])
            raise UserError(f"no usable images in {root}: {len(self.skipped)} files skipped"
                            + (f" ({shown}{', ...' if len(self.skipped) > 3 else ''})" if shown else "")
                            + "; point --data at a folder of images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, generator = _split_key(key)
        n = len(self.samples)
        for attempt in range(min(n, 100)):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                return {"image": load_image(path, self.image_size, self.channels, self.augment, generator),
                        "label": label}
            except Exception as e:  # a file that went bad after the scan (or a lazy folder)
                self._bad.add(i)
                self.skipped.append((path, _reason(e)))
                logger.warning("skipped %s (%s); using the next image instead", path, _reason(e))
        raise UserError(f"no usable images near index {index} in {self.root}: 100 files in a row failed to "
                        "decode; check the folder")


# ----------------------------------------------------------------------------------------------------------
# WebDataset shards

def _mix(*parts: Any) -> int:
    """A well-mixed 63-bit seed from any values (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _expand_shards(spec: str | Sequence[str]) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # pragma: no cover - comes with webdataset
        raise UserError("reading .tar shards needs the webdataset package: pip install 'rqvae[webdataset]'") \
            from None
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards = [s for sp in specs for part in sp.split("::") for s in braceexpand(part)]
    missing = [s for s in shards if "://" not in s and not os.path.isfile(s)]
    if missing:
        raise UserError(f"{len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}); "
                        "check the shard pattern, e.g. shards/{000..009}.tar")
    return shards


class WebImageDataset(IterableDataset):
    """Images streamed from WebDataset ``.tar`` shards (image key jpg/jpeg/png/webp/..., optional label key
    cls/label/txt holding an integer).

    Each (rank, worker) stream reads its own shards in an order that depends on ``(seed, epoch)``
    (or, with fewer shards than streams, every n-th sample), shuffles through a buffer of
    ``shuffle_buffer`` samples, and decodes after shuffling. An undecodable sample is counted, logged and
    replaced by the previous good one, so that stream positions (and therefore resumes) do not shift.
    ``iter(ds)`` yields one epoch for this process's rank/worker; :func:`make_loader` streams forever."""

    accepts_seeded_keys = False

    def __init__(self, shards: str | Sequence[str], image_size: int, channels: int = 3, augment: bool = False,
                 shuffle_buffer: int = 1000, num_classes: int | None = None, seed: int = 0):
        _check_args(image_size, channels)
        try:
            import webdataset  # noqa: F401
        except ImportError:
            raise UserError("reading .tar shards needs the webdataset package: "
                            "pip install 'rqvae[webdataset]'") from None
        self.shards = _expand_shards(shards)
        self.image_size, self.channels, self.augment = image_size, channels, augment
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.skipped: list[tuple[str, str]] = []
        self.skipped_count = 0
        # peek at the shards: the first decodable sample proves the data usable; labels of the first shard
        # give the number of classes unless it is passed
        labels: list[int] = []
        usable = False
        for si, shard in enumerate(self.shards):
            for raw in self._read_shard(shard):
                if si == 0:
                    lab = self._label(raw)
                    labels.append(lab if lab is not None else 0)
                if not usable:
                    usable = self._decode(raw, None) is not None
                if usable and si > 0:
                    break
            if usable:
                break
        if not usable:
            raise UserError(f"no usable images in {len(self.shards)} shards ({self.shards[0]}, ...): "
                            f"{self.skipped_count} samples skipped; check that samples have jpg/png/webp "
                            "entries")
        self.num_classes = num_classes or (max(labels) + 1 if labels else 1)
        self.class_names = [str(i) for i in range(self.num_classes)]
        self.skipped, self.skipped_count = [], 0

    # raw samples -------------------------------------------------------------------------------------
    def _handler(self, exn: Exception) -> bool:
        self.skipped_count += 1
        self.skipped.append((str(exn.args[-1]) if exn.args else "?", _reason(exn)))
        logger.warning("skipped a broken tar entry (%s)", _reason(exn))
        return True

    def _read_shard(self, shard: str) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples
        yield from tarfile_samples([{"url": shard}], handler=self._handler)

    def raw_samples(self, epoch: int, stream: int, n_streams: int) -> Iterator[dict[str, Any]]:
        """One epoch of undecoded samples for stream ``stream`` of ``n_streams``, shuffled."""
        order = list(self.shards)
        random.Random(_mix(self.seed, epoch, "shards")).shuffle(order)
        if len(order) >= n_streams:
            source = (s for shard in order[stream::n_streams] for s in self._read_shard(shard))
        else:
            every = (s for shard in order for s in self._read_shard(shard))
            source = itertools.islice(every, stream, None, n_streams)
        rng = random.Random(_mix(self.seed, epoch, stream, n_streams, "buffer"))
        buf: list[dict[str, Any]] = []
        for s in source:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    # decoding ----------------------------------------------------------------------------------------
    @staticmethod
    def _label(raw: dict[str, Any]) -> int | None:
        for k in WDS_LABEL_KEYS:
            if k in raw:
                try:
                    return int(raw[k].decode().strip())
                except (ValueError, UnicodeDecodeError, AttributeError):
                    return None
        return 0

    def _decode(self, raw: dict[str, Any], aug_seed: int | None) -> dict[str, Any] | None:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
        label = self._label(raw)
        try:
            if key is None:
                raise ValueError(f"no image entry (has {sorted(k for k in raw if not k.startswith('__'))})")
            if label is None or label < 0:
                raise ValueError("label is not a non-negative integer")
            g = torch.Generator().manual_seed(aug_seed) if aug_seed is not None else None
            image = load_image(raw[key], self.image_size, self.channels, self.augment, g)
        except Exception as e:
            self.skipped_count += 1
            if len(self.skipped) < 1000:
                self.skipped.append((where, _reason(e)))
            if self.skipped_count <= 10 or self.skipped_count % 1000 == 0:
                logger.warning("skipped sample %s (%s); %d skipped so far", where, _reason(e),
                               self.skipped_count)
            return None
        return {"image": image, "label": label}

    def stream(self, stream: int, n_streams: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Decoded samples forever (epoch after epoch). Position p of the output is raw sample p of the
        stream, or the previous good sample when p does not decode, so ``skip`` raw samples are skipped
        without decoding them and the stream continues exactly where an earlier one stopped."""
        last: deque[tuple[int, dict[str, Any]]] = deque(maxlen=16)  # recent raw samples, for resume
        good: dict[str, Any] | None = None
        pending = 0  # undecodable samples before the first good one
        pos = 0
        for epoch in itertools.count():
            n_epoch = 0
            for raw in self.raw_samples(epoch, stream, n_streams):
                n_epoch += 1
                if pos < skip:
                    last.append((pos, raw))
                    pos += 1
                    if pos == skip:  # the previous good sample, for substitutions right after a resume
                        for p, r in reversed(last):
                            good = self._decode(r, _mix(self.seed, stream, n_streams, p))
                            if good is not None:
                                break
                    continue
                sample = self._decode(raw, _mix(self.seed, stream, n_streams, pos))
                pos += 1
                if sample is None:
                    if good is None:
                        pending += 1
                        continue
                    sample = good
                else:
                    good = sample
                for _ in range(pending + 1):
                    yield sample
                pending = 0
            if n_epoch == 0:
                raise UserError(f"stream {stream} of {n_streams} got no samples from "
                                f"{len(self.shards)} shards")
            if good is None and pos > skip:  # a whole epoch without one decodable sample
                raise UserError(f"no usable images in a whole epoch of {len(self.shards)} shards "
                                f"({self.skipped_count} samples skipped)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The ``index``-th decodable sample in shard order, without augmentation (for previews: it reads
        the shards from the start)."""
        if index < 0:
            raise IndexError(index)
        n = 0
        for shard in self.shards:
            for raw in self._read_shard(shard):
                key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
                label = self._label(raw)
                try:
                    image = load_image(raw[key], self.image_size, self.channels)  # type: ignore[index]
                except Exception:
                    continue
                if n == index:
                    return {"image": image, "label": label or 0}
                n += 1
        raise IndexError(f"index {index} is past the {n} decodable samples of the shards")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _dist_rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n_streams, stream = world * nw, rank * nw + wid
        for i, raw in enumerate(self.raw_samples(0, stream, n_streams)):
            sample = self._decode(raw, _mix(self.seed, stream, n_streams, i) if self.augment else None)
            if sample is not None:
                yield sample


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------------------
# building a dataset from a spec string

def build_image_dataset(spec: str, image_size: int, channels: int, split: str = "train",
                        augment: bool = False, **kwargs: Any) -> Dataset:
    """A dataset from a spec: an image folder, a ``.tar`` shard pattern (``shards/{000..009}.tar``), or
    ``fmnist`` / ``fmnist:/dir`` (Fashion-MNIST IDX files). Extra keyword arguments go to the dataset class
    (``eager_scan_limit`` for folders; ``shuffle_buffer``, ``num_classes``, ``seed`` for shards)."""
    spec = str(spec)
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = spec.split(":", 1)[1] if ":" in spec else FMNIST_DIR
        return FashionMNIST(root or FMNIST_DIR, image_size, channels, split=split, augment=augment)
    if any(part.endswith(".tar") or part.endswith(".tar}") for part in spec.split("::")) or (
            "{" in spec and ".tar" in spec):
        return WebImageDataset(spec, image_size, channels, augment=augment, **kwargs)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"dataset {spec} does not exist; pass an image folder, a .tar shard pattern "
                        "(shards/{000..009}.tar) or 'fmnist'")
    if not path.is_dir():
        raise UserError(f"dataset {spec} is a file; pass a folder of images, a .tar shard pattern "
                        "or 'fmnist'")
    return ImageFolderDataset(path, image_size, channels, split=split, augment=augment, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# deterministic, resumable loading

def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per rank per epoch for a map-style dataset of ``n`` samples (DistributedSampler padding)."""
    per_rank = math.ceil(n / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """This rank's sample indices for one epoch and an augmentation seed per position, both (ceil(n/W),).
    The permutation depends on (seed, epoch) only; it is padded by wrapping to a multiple of world_size and
    rank r takes positions r, r + W, ... (as DistributedSampler does)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, "order"))
    perm = torch.randperm(n, generator=g)
    aug = torch.randint(2**62, (n,), generator=g)
    total = math.ceil(n / world_size) * world_size
    pad = torch.arange(total - n) % n
    perm, aug = torch.cat([perm, perm[pad]]), torch.cat([aug, aug[pad]])
    return perm[rank:total:world_size], aug[rank:total:world_size]


class ResumableBatchSampler:
    """Yields lists of keys forever, epoch after epoch, starting at batch ``start_step`` of this rank."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, drop_last: bool = True, seeded_keys: bool = True):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.steps_per_epoch = steps_per_epoch(n, batch_size, world_size, drop_last)
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {n} images, fewer than batch size {batch_size} per rank x "
                            f"{world_size} ranks; lower the batch size or add images")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.start_step, self.seeded_keys = start_step, seeded_keys

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order, aug = epoch_order(self.n, self.seed, epoch, self.rank, self.world_size)
            for b in range(offset, self.steps_per_epoch):
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                if self.seeded_keys:
                    yield list(zip(order[sl].tolist(), aug[sl].tolist()))
                else:
                    yield order[sl].tolist()
            epoch, offset = epoch + 1, 0


def collate(items: list[dict[str, Any]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch {"image": (B, C, S, S), "label": (B,)}; batched dicts pass through."""
    if isinstance(items, dict):
        return items
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long)}


class _WebBatches(IterableDataset):
    """Batches from a WebImageDataset: worker w plays stream role (w + start_step) % num_workers, so that
    the DataLoader's round-robin over workers yields batches start_step, start_step + 1, ... in order."""

    def __init__(self, ds: WebImageDataset, batch_size: int, rank: int, world_size: int, start_step: int,
                 num_workers: int):
        self.ds, self.batch_size, self.rank, self.world_size = ds, batch_size, rank, world_size
        self.start_step, self.n_roles = start_step, max(1, num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        role = (wid + self.start_step) % self.n_roles
        s = self.start_step
        done = max(0, -(-(s - role) // self.n_roles))  # batches i < s with i % n_roles == role
        stream = self.ds.stream(self.rank * self.n_roles + role, self.world_size * self.n_roles,
                                skip=done * self.batch_size)
        while True:
            yield collate(list(itertools.islice(stream, self.batch_size)))


def make_loader(ds: Dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, drop_last: bool = True,
                pin_memory: bool = False) -> DataLoader:
    """An endless loader of dict batches {"image": (B, C, S, S), "label": (B,)} starting at ``start_step``.

    Map-style datasets: the order is a function of (seed, epoch) only and rank ``rank`` of ``world_size``
    takes its shard of each epoch; batch k of the loader is the same whether a run started at 0 or resumed
    at any step <= k. WebDataset streams: the same holds as long as ``num_workers`` and the world size are
    unchanged between runs. With ``drop_last=False`` the last batch of an epoch may be smaller."""
    if isinstance(ds, WebImageDataset):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        ds.seed = seed
        return DataLoader(_WebBatches(ds, batch_size, rank, world_size, start_step, num_workers),
                          batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
    sampler = ResumableBatchSampler(len(ds), batch_size, seed, rank, world_size, start_step, drop_last,
                                    seeded_keys=getattr(ds, "accepts_seeded_keys", False))
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def batches(ds: Dataset, batch_size: int, seed: int = 0, start_step: int = 0, rank: int = 0,
            world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches in the main process (see :func:`make_loader`)."""
    yield from make_loader(ds, batch_size, seed, rank, world_size, start_step, num_workers=0)
