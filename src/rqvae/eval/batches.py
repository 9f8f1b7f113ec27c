"""Image batches for evaluation: seeded subsets of a dataset, with an optional progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from rqvae.data.loader import collate
from rqvae.errors import UserError
from rqvae.progress import progress_iter


def subset_indices(n: int, count: int | None, seed: int = 0) -> list[int]:
    """All indices, or a seeded random subset of ``count`` of them in increasing order."""
    if count is None or count >= n:
        return list(range(n))
    if count < 2:
        raise UserError(f"FID needs at least 2 images, got count {count}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:count].tolist())


def dataset_batches(ds: Dataset, batch_size: int, count: int | None = None, seed: int = 0,
                    with_labels: bool = False) -> Iterator[Any]:
    """Image batches (B, C, S, S) (with labels (B,) if asked) from an rqvae.data dataset: a seeded subset
    of ``count`` images of a map-style dataset, or the first ``count`` of a stream."""
    if isinstance(ds, IterableDataset):
        items: list[dict[str, Any]] = []
        for i, item in enumerate(ds):
            if count is not None and i >= count:
                break
            items.append(item)
            if len(items) == batch_size:
                b = collate(items)
                items = []
                yield (b["image"], b["label"]) if with_labels else b["image"]
        if items:
            b = collate(items)
            yield (b["image"], b["label"]) if with_labels else b["image"]
        return
    idx = subset_indices(len(ds), count, seed)  # type: ignore[arg-type]
    getitems = getattr(ds, "__getitems__", None)
    for i in range(0, len(idx), batch_size):
        keys = idx[i:i + batch_size]
        b = collate(getitems(keys) if getitems else [ds[k] for k in keys])
        yield (b["image"], b["label"]) if with_labels else b["image"]


def _counted(batches: Iterable[Any], counter: list[int]) -> Iterator[Any]:
    for b in batches:
        counter[0] += (b[0] if isinstance(b, tuple) else b).shape[0]
        yield b


def progress_bar(batches: Iterable[Any], total: int | None, desc: str, enabled: bool) -> Iterable[Any]:
    """``batches`` with progress output (a bar on a terminal, a plain line every 30 s elsewhere)."""
    if not enabled:
        return batches
    return progress_iter(batches, total, desc, unit="batch")
