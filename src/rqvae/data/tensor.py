"""Small in-memory image sets (tests, demos, Fashion-MNIST) as one tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rqvae.data.common import Key, split_key
from rqvae.errors import UserError


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
        split = [split_key(k) for k in keys]
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
