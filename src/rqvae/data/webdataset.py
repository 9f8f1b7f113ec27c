"""Images streamed from WebDataset ``.tar`` shards (for data that outgrows a folder)."""

from __future__ import annotations

import itertools
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from rqvae import distributed as dist
from rqvae.data.common import check_args, logger, mix, reason
from rqvae.data.images import check_resize_mode, load_image
from rqvae.errors import UserError

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
WDS_LABEL_KEYS = ("cls", "label", "txt")


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
                 shuffle_buffer: int = 1000, num_classes: int | None = None, seed: int = 0,
                 resize_mode: str = "crop"):
        check_args(image_size, channels)
        self.resize_mode = check_resize_mode(resize_mode)  # "crop" or "pad" (rqvae.data.images)
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
        self.skipped.append((str(exn.args[-1]) if exn.args else "?", reason(exn)))
        logger.warning("skipped a broken tar entry (%s)", reason(exn))
        return True

    def _read_shard(self, shard: str) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples
        yield from tarfile_samples([{"url": shard}], handler=self._handler)

    def raw_samples(self, epoch: int, stream: int, n_streams: int) -> Iterator[dict[str, Any]]:
        """One epoch of undecoded samples for stream ``stream`` of ``n_streams``, shuffled."""
        order = list(self.shards)
        random.Random(mix(self.seed, epoch, "shards")).shuffle(order)
        if len(order) >= n_streams:
            source = (s for shard in order[stream::n_streams] for s in self._read_shard(shard))
        else:
            every = (s for shard in order for s in self._read_shard(shard))
            source = itertools.islice(every, stream, None, n_streams)
        rng = random.Random(mix(self.seed, epoch, stream, n_streams, "buffer"))
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
            image = load_image(raw[key], self.image_size, self.channels, self.augment, g, self.resize_mode)
        except Exception as e:
            self.skipped_count += 1
            if len(self.skipped) < 1000:
                self.skipped.append((where, reason(e)))
            if self.skipped_count <= 10 or self.skipped_count % 1000 == 0:
                logger.warning("skipped sample %s (%s); %d skipped so far", where, reason(e),
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
                            good = self._decode(r, mix(self.seed, stream, n_streams, p))
                            if good is not None:
                                break
                    continue
                sample = self._decode(raw, mix(self.seed, stream, n_streams, pos))
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
                    image = load_image(raw[key], self.image_size, self.channels,  # type: ignore[index]
                                       resize_mode=self.resize_mode)
                except Exception:
                    continue
                if n == index:
                    return {"image": image, "label": label or 0}
                n += 1
        raise IndexError(f"index {index} is past the {n} decodable samples of the shards")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = dist.get_rank(), dist.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n_streams, stream = world * nw, rank * nw + wid
        for i, raw in enumerate(self.raw_samples(0, stream, n_streams)):
            sample = self._decode(raw, mix(self.seed, stream, n_streams, i) if self.augment else None)
            if sample is not None:
                yield sample
