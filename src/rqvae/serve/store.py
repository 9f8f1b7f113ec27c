"""In-memory state of a running server: images (generated or uploaded, each with its code map) and
generation jobs. Both are bounded: the oldest entries go first."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from rqvae.serve.views import Views


def new_id() -> str:
    return secrets.token_hex(6)


@dataclass
class Item:
    """One image the page can inspect: its codes, and views decoded on first use."""

    codes: torch.Tensor  # (1, h, w, D) int64, on the CPU
    label: str  # what made it, e.g. "class 3 (Dress), seed 0, #2" or the uploaded file's name
    kind: str  # "generated" | "upload"
    original: torch.Tensor | None = None  # (C, H, W) in [-1, 1]: the uploaded image as the model sees it
    id: str = field(default_factory=new_id)
    views: Views | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class Job:
    """A generation request running in a worker thread; the page polls its progress."""

    total: int
    id: str = field(default_factory=new_id)
    done: int = 0
    state: str = "running"  # "running" | "done" | "error"
    error: str | None = None
    item_ids: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "done": self.done, "total": self.total,
                "error": self.error, "items": list(self.item_ids)}


class Bounded:
    """A thread-safe dict that keeps the ``size`` most recently added or read entries."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
            return self._data.get(key)


class Store:
    """The items and jobs of a running server, the oldest dropped first."""

    def __init__(self, max_items: int = 2048, max_jobs: int = 256):
        self._items, self._jobs = Bounded(max_items), Bounded(max_jobs)

    def add_item(self, item: Item) -> Item:
        self._items.add(item.id, item)
        return item

    def item(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def add_job(self, job: Job) -> Job:
        self._jobs.add(job.id, job)
        return job

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)
