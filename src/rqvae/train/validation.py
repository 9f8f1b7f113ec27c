"""Held-out data and early stopping, shared by both training stages.

``--val-data SPEC`` names a separate dataset; ``--val-split F`` holds out a seeded fraction F of the
training data instead (training never sees it: :func:`holdout_indices`, :class:`IndexSubset`). Every
``--val-every N`` steps (and at the last step) the task's ``validate`` hook returns ``val/*`` metrics and
the trainer follows the task's ``val_metric`` (lower is better) with a :class:`BestTracker`: the best
model so far is kept (in the checkpoints too, so resume stays exact), ``RUN/model/`` is that best model
and ``RUN/model-last/`` the final one. ``--early-stop P`` ends the run after P validations in a row
without improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from rqvae.config import option
from rqvae.data.common import split_key
from rqvae.errors import UserError

VAL_HELP = ("with validation, RUN/model/ is the best model on the validation data and RUN/model-last/ the "
            "final one")


@dataclass(kw_only=True)
class ValidationConfig:
    """The validation options of a training command (a mixin of its config dataclass)."""

    val_data: str | None = option(None, "validation data (same kinds of spec as --data); " + VAL_HELP)
    val_split: float = option(0.0, "hold out this seeded fraction of the training data for validation "
                                   "(training never sees it); instead of --val-data")
    val_every: int = option(0, "steps between validations (0: 500, or --steps if smaller, when "
                               "validation data is given)")
    early_stop: int | None = option(None, "stop after this many validations in a row without improvement "
                                          "of the validation metric", metavar="PATIENCE")

    def has_validation(self) -> bool:
        return self.val_data is not None or self.val_split > 0

    def validation_interval(self, steps: int) -> int:
        return self.val_every or max(1, min(500, steps))

    def check_validation(self) -> None:
        checks = [
            (0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1), got {self.val_split}"),
            (not (self.val_data and self.val_split), "give --val-data or --val-split, not both"),
            (self.val_every >= 0, f"--val-every must be >= 0, got {self.val_every}"),
            (self.early_stop is None or self.early_stop >= 1,
             f"--early-stop must be >= 1, got {self.early_stop}"),
            (self.early_stop is None or self.has_validation(),
             "--early-stop needs validation data: add --val-data SPEC or --val-split 0.05"),
            (not self.val_every or self.has_validation(),
             "--val-every needs validation data: add --val-data SPEC or --val-split 0.05"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def is_validation_step(self, step: int, end: int) -> bool:
        return self.has_validation() and (step % self.validation_interval(end) == 0 or step == end)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``range(n)`` -> (training indices, held-out indices), both sorted; at least one
    item on each side."""
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise UserError(f"--val-split {fraction} of {n} items leaves nothing to train on; use a smaller "
                        "fraction or --val-data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class IndexSubset(Dataset):
    """The items ``indices`` of a map-style dataset; loader keys with augmentation seeds pass through, and
    the dataset's other attributes (``class_names``, ``skipped``, ...) are the parent's."""

    def __init__(self, dataset: Any, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, indices.tolist()
        self.accepts_seeded_keys = getattr(dataset, "accepts_seeded_keys", False)

    def __len__(self) -> int:
        return len(self.indices)

    def _map(self, key: Any) -> Any:
        index, _ = split_key(key)
        return (self.indices[index], key[1]) if isinstance(key, tuple) else self.indices[index]

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[self._map(key)]

    def __getitems__(self, keys: list[Any]) -> Any:
        """Batched access where the parent has it (the loader's fast path)."""
        getitems = getattr(self.dataset, "__getitems__", None)
        mapped = [self._map(k) for k in keys]
        return getitems(mapped) if getitems is not None else [self.dataset[k] for k in mapped]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "indices"):  # no dunders; not set yet when unpickling
            raise AttributeError(name)
        return getattr(self.dataset, name)


def image_batches(dataset: Any, batch_size: int) -> Any:
    """(B, C, S, S) image batches of a map-style dataset in order, without augmentation draws."""
    n = len(dataset)
    for i in range(0, n, batch_size):
        yield torch.stack([dataset[k]["image"] for k in range(i, min(n, i + batch_size))])


def split_for_validation(dataset: Any, fraction: float, seed: int, val_source: Any = None) -> tuple[Any, Any]:
    """(training part, held-out part) of a map-style dataset for ``--val-split``; ``val_source``: the same
    items without augmentation, to take the held-out part from (default: ``dataset``)."""
    if not hasattr(dataset, "__len__"):
        raise UserError("--val-split needs a dataset of known length (an image folder or fmnist); with "
                        "WebDataset shards give --val-data SHARDS")
    train_idx, val_idx = holdout_indices(len(dataset), fraction, seed)
    held_out = IndexSubset(dataset if val_source is None else val_source, val_idx)
    return IndexSubset(dataset, train_idx), held_out


def val_split_name(spec: str) -> str:
    """The split of a ``--val-data`` spec to read: Fashion-MNIST's test split; a folder's val/valid/
    validation/test sub-folder when it has one (else all of its images)."""
    if spec == "fmnist" or spec.startswith("fmnist:"):
        return "test"
    root = Path(spec)
    return next((name for name in ("val", "valid", "validation", "test") if (root / name).is_dir()), "train")


class BestTracker:
    """The best value so far of a validation metric (lower is better) and the validations since."""

    def __init__(self, metric: str, patience: int | None) -> None:
        self.metric, self.patience = metric, patience
        self.best, self.best_step, self.bad = math.inf, -1, 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record a validation; True when it is the best so far."""
        value = metrics.get(self.metric)
        if value is None:
            return False
        if value < self.best:
            self.best, self.best_step, self.bad = float(value), step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "best_step": self.best_step,
                "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state["best"]
        self.best = math.inf if best is None else float(best)
        self.best_step, self.bad = int(state["best_step"]), int(state["bad"])


def per_depth(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """{prefix_d1: v1, prefix_d2: v2, ...}"""
    return {f"{prefix}_d{d}": float(v) for d, v in enumerate(values, start=1)}
