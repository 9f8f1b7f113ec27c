"""Resumable tensors on disk: a tensor computed in chunks, each chunk saved as soon as it is done, so an
interrupted pass (Inception features, generated samples) continues at the first missing chunk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from rqvae.eval.fid import FeatureStats, stats_distance


def chunked(folder: Path, n: int, fn: Callable[[int, int], torch.Tensor], chunk: int = 500) -> torch.Tensor:
    """``torch.cat([fn(i, min(n, i + chunk)) for i in range(0, n, chunk)])``, each chunk cached as
    ``folder/{i:06d}-{stop:06d}.pt`` (written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, n, chunk):
        stop = min(n, i + chunk)
        path = folder / f"{i:06d}-{stop:06d}.pt"
        if path.is_file():
            parts.append(torch.load(path))
            continue
        part = fn(i, stop)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(part, tmp)
        os.replace(tmp, path)
        parts.append(part)
    return torch.cat(parts)


def missing(folder: Path, n: int, chunk: int = 500) -> int:
    """How many of the ``n`` items of :func:`chunked` are not on disk yet."""
    return sum(min(n, i + chunk) - i for i in range(0, n, chunk)
               if not (folder / f"{i:06d}-{min(n, i + chunk):06d}.pt").is_file())


def features(folder: Path, images: torch.Tensor, net) -> torch.Tensor:
    """Inception pool features (N, 2048) of images (N, C, S, S) in [-1, 1], cached in chunks."""
    return chunked(folder, len(images), lambda i, j: net(images[i:j]))


def stats(feats: torch.Tensor) -> FeatureStats:
    """The Gaussian summary FID uses (mean, unbiased covariance) of features (N, F)."""
    f = feats.double()
    mu = f.mean(0)
    return FeatureStats(mu, torch.cov(f.T), len(f))


def fid(a: torch.Tensor, b: torch.Tensor, net) -> float:
    """FID between two feature sets (N, F), (M, F)."""
    return stats_distance(stats(a), stats(b), net)
