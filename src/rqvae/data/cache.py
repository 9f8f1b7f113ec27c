"""Where rqvae caches things, and the fingerprint that tells when cached data went stale.

One root for every cache: ``$RQVAE_CACHE``, else ``$XDG_CACHE_HOME/rqvae``, else ``~/.cache/rqvae``; each
kind of cache (``features``, ``fid_stats``) is a folder under it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from rqvae.data.fmnist import FMNIST_DIR


def cache_root() -> Path:
    """``$RQVAE_CACHE``, else ``$XDG_CACHE_HOME/rqvae``, else ``~/.cache/rqvae``."""
    if os.environ.get("RQVAE_CACHE"):
        return Path(os.environ["RQVAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rqvae"


def cache_dir(kind: str, override: str | os.PathLike | None = None) -> Path:
    """The folder of one kind of cache (``features``, ``fid_stats``): ``override`` if given, else
    ``cache_root() / kind``."""
    return Path(override) if override is not None else cache_root() / kind


def dataset_files(ds: Any) -> list[str] | None:
    """The image files behind a dataset, in item order, when the dataset lists them
    (``ImageFolderDataset.samples`` holds (path, label) pairs)."""
    samples = getattr(ds, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return [str(s[0]) for s in samples]
    for name in ("paths", "files", "image_paths"):
        files = getattr(ds, name, None)
        if isinstance(files, (list, tuple)):
            return [str(p) for p in files]
    return None


def _spec_files(spec: str) -> tuple[list[str], str] | None:
    """All files under the folder behind a data spec (an image folder or Fashion-MNIST's folder), sorted,
    and that folder; None for other specs (shard patterns)."""
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = Path((spec.split(":", 1)[1] if ":" in spec else "") or FMNIST_DIR)
    else:
        root = Path(spec)
    if not root.is_dir():
        return None
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, name) for name in sorted(filenames)]
    return files, str(root)


def data_fingerprint(source: str | Any) -> str:
    """A hash of a dataset's content, so that changed data gets new cache entries.

    ``source`` is a data spec (files under its folder: relative path, size, mtime; a shard pattern: the
    spec itself, without building the dataset) or a built dataset (its files: path, size, mtime; else the
    pixels of an in-memory tensor; else its length), plus a dataset's labels when it holds them and its
    resize mode when it is not the default crop."""
    h = hashlib.sha256()
    if isinstance(source, str):
        files, root = _spec_files(source) or (None, None)
        if files is None:
            h.update(source.encode())
    else:
        files, root = dataset_files(source), None
        if files is None and isinstance(getattr(source, "shards", None), list):
            files = [str(p) for p in source.shards]  # WebDataset shards: one entry per .tar file
        images = getattr(source, "images", None)
        if files is None and isinstance(images, torch.Tensor):
            h.update(str(tuple(images.shape)).encode())
            h.update(images.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif files is None:
            h.update(f"len={dataset_length(source)}".encode())
    for p in files or []:
        try:
            st = os.stat(p)
        except OSError:
            h.update(f"{p}\0missing\n".encode())
            continue
        name = os.path.relpath(p, root) if root is not None else p
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if getattr(source, "resize_mode", "crop") != "crop":  # other pixels from the same files
        h.update(f"resize_mode={source.resize_mode}\n".encode())
    labels = getattr(source, "labels", None)
    if isinstance(labels, torch.Tensor):
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_length(ds: Any) -> int | None:
    """``len(ds)``, or None for a streamed (WebDataset) source."""
    try:
        return len(ds)
    except TypeError:
        return None
