"""A deterministic, resumable loader.

The loader's order is a function of ``(seed, epoch)`` only. Each rank takes its own shard of every epoch (like
``DistributedSampler``), and a loader can start at any step, so a resumed run sees exactly the batches that
the interrupted run would have seen next. Augmentations draw from a seed that the loader derives from
``(seed, epoch, position)``, so they too are identical after a resume and whatever ``num_workers`` is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rqvae.data.common import Key, mix
from rqvae.data.webdataset import WebImageDataset
from rqvae.errors import UserError


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per rank per epoch for a map-style dataset of ``n`` samples (DistributedSampler padding)."""
    per_rank = math.ceil(n / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """This rank's sample indices for one epoch and an augmentation seed per position, both (ceil(n/W),).
    The permutation depends on (seed, epoch) only; it is padded by wrapping to a multiple of world_size and
    rank r takes positions r, r + W, ... (as DistributedSampler does)."""
    g = torch.Generator().manual_seed(mix(seed, epoch, "order"))
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
