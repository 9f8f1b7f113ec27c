"""FID: feature statistics of image sets, the Frechet distance, and cached reference statistics.

FID (Heusel et al.) compares two image sets through the 2048-d pool features f of the TF-2015
InceptionV3, each set summarised by a Gaussian (mean mu, covariance Sigma):

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

The paper's protocol: images are resized to 299x299 (bilinear) and scored against the statistics of
the training set (50K samples); rFID scores a tokenizer by comparing validation images with their
reconstructions. The statistics and the distance are torchmetrics' ``FrechetInceptionDistance``; this
module supplies the network (:class:`InceptionFeatures`) and caches reference statistics on disk.

Reference statistics are cached under ``cache_dir("fid_stats")`` (:mod:`rqvae.data.cache`), keyed by the
data spec, split, image size, count, subset seed, :func:`~rqvae.data.cache.data_fingerprint` of the files
and the network's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import IterableDataset

from rqvae.data.build import build_image_dataset
from rqvae.data.cache import cache_dir as cache_dir_for
from rqvae.data.cache import data_fingerprint
from rqvae.errors import UserError
from rqvae.eval.batches import dataset_batches, progress_bar, subset_indices
from rqvae.eval.inception import INCEPTION_SIZE, InceptionFeatures
from rqvae.models.hub import atomic_save_safetensors

STATS_FORMAT = "rqvae-fid-stats-v1"


@dataclass
class FeatureStats:
    """A Gaussian summary of a set's features: mu (F,), sigma (F, F) float64, from ``count`` images."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int

    @classmethod
    def from_metric(cls, metric: Any, real: bool = True) -> FeatureStats:
        """From the running sums of a torchmetrics FrechetInceptionDistance."""
        p = "real" if real else "fake"
        n = int(getattr(metric, f"{p}_features_num_samples"))
        if n < 2:
            raise UserError(f"FID statistics need at least 2 images, got {n}")
        s = getattr(metric, f"{p}_features_sum").double()  # (F,)
        ss = getattr(metric, f"{p}_features_cov_sum").double()  # (F, F) sum of f f^T
        mu = s / n
        sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
        return cls(mu.cpu(), sigma.cpu(), n)

    def load_into(self, metric: Any, real: bool = True) -> None:
        """Set a FrechetInceptionDistance's running sums so that they summarise this set."""
        p = "real" if real else "fake"
        n = self.count
        dev = getattr(metric, f"{p}_features_sum").device
        setattr(metric, f"{p}_features_sum", (self.mu * n).double().to(dev))
        setattr(metric, f"{p}_features_cov_sum",
                (self.sigma * (n - 1) + n * torch.outer(self.mu, self.mu)).double().to(dev))
        setattr(metric, f"{p}_features_num_samples", torch.tensor(n, dtype=torch.long, device=dev))

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": STATS_FORMAT, "count": str(self.count)}
        meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
        tensors = {"mu": self.mu.double().contiguous(), "sigma": self.sigma.double().contiguous()}
        atomic_save_safetensors(tensors, path, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[FeatureStats, dict[str, Any]]:
        """The statistics and the metadata they were saved with (values JSON-decoded)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"FID statistics file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path} is not a safetensors statistics file ({e}); recompute it with "
                            "`rqvae eval --ref SPEC --save-stats PATH`") from None
        if raw.get("format") != STATS_FORMAT or "mu" not in tensors or "sigma" not in tensors:
            raise UserError(f"{path} is not an rqvae FID statistics file (format {raw.get('format')!r}); "
                            "recompute it with `rqvae eval --ref SPEC --save-stats PATH`")
        mu, sigma = tensors["mu"], tensors["sigma"]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path} has mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)}, which do not "
                            "match; the file is damaged, recompute it")
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "count")}
        return cls(mu.double(), sigma.double(), int(raw["count"])), meta


def fid_metric(net: nn.Module) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow import (~1 s): only when scoring

    return FrechetInceptionDistance(feature=net, reset_real_features=False)


def compute_stats(batches: Iterable[torch.Tensor], net: nn.Module) -> FeatureStats:
    """Feature statistics of images given as batches (B, C, H, W) in [-1, 1]."""
    metric = fid_metric(net)
    for x in batches:
        metric.update(x, real=True)
    return FeatureStats.from_metric(metric, real=True)


def frechet_distance(batches: Iterable[torch.Tensor], reference: FeatureStats,
                     net: nn.Module) -> tuple[float, FeatureStats]:
    """FID of the images in ``batches`` against reference statistics; also returns the images' statistics."""
    metric = fid_metric(net)
    reference.load_into(metric, real=True)
    for x in batches:
        metric.update(x, real=False)
    stats = FeatureStats.from_metric(metric, real=False)
    if stats.mu.shape != reference.mu.shape:
        raise UserError(f"reference statistics have {reference.mu.shape[0]} features but the network gives "
                        f"{stats.mu.shape[0]}; they were computed with another network")
    return float(metric.compute()), stats


def stats_distance(a: FeatureStats, b: FeatureStats, net: nn.Module) -> float:
    """FID between two sets given by their statistics (the same computation as :func:`frechet_distance`)."""
    metric = fid_metric(net)
    a.load_into(metric, real=True)
    b.load_into(metric, real=False)
    metric.orig_dtype = torch.float32  # set by torchmetrics' update(), which loaded statistics skip
    with warnings.catch_warnings():  # "compute before update": the statistics were loaded, not updated
        warnings.simplefilter("ignore", UserWarning)
        return float(metric.compute())


def fid_floor(spec: str, split: str, count: int, reference: FeatureStats, net: InceptionFeatures,
              image_size: int, channels: int = 3, batch_size: int = 50,
              cache_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool = False) -> float:
    """The floor of an FID measured with ``count`` images: the FID of ``count`` REAL images of ``spec``'s
    ``split`` against the same reference. FID is biased upwards at small sizes (a few thousand images or
    fewer), so a model's FID means something only next to this value at the same size."""
    real, _, _ = reference_stats(spec, net, image_size, channels, split, count, batch_size, cache_dir, seed,
                                 progress)
    return stats_distance(reference, real, net)


def _canonical_spec(spec: str) -> str:
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = spec.split(":", 1)[1] if ":" in spec else ""
        return "fmnist:" + (str(Path(root).resolve()) if root else "default")
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def reference_cache_entry(spec: str, net: InceptionFeatures, image_size: int, channels: int = 3,
                          split: str = "train", count: int | None = None, seed: int = 0,
                          cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """The cache file and key of a dataset's statistics: the spec, split, image size, channels, count,
    subset seed, a fingerprint of the files and the network's SHA-256."""
    key = {"spec": _canonical_spec(spec), "split": split, "image_size": image_size, "channels": channels,
           "count": count, "seed": seed, "data": data_fingerprint(spec)[:16], "network_sha256": net.sha256,
           "resize": f"bilinear-{INCEPTION_SIZE}"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(spec.rstrip("/")).name or spec).strip("_")[:40] or "data"
    name = f"{slug}-{split}-{image_size}px-n{count or 'all'}-{digest}.safetensors"
    path = cache_dir_for("fid_stats", cache_dir) / name
    return path, key


def load_cached_stats(path: Path, key: dict[str, Any]) -> FeatureStats | None:
    """The cached statistics if the file exists and was written for ``key``; None otherwise."""
    if not path.is_file():
        return None
    try:
        stats, meta = FeatureStats.load(path)
    except UserError:
        return None  # a damaged cache file is recomputed
    return stats if meta.get("key") == key else None


def reference_stats(spec: str, net: InceptionFeatures, image_size: int, channels: int = 3,
                    split: str = "train", count: int | None = None, batch_size: int = 50,
                    cache_dir: str | os.PathLike | None = None, seed: int = 0,
                    progress: bool = False) -> tuple[FeatureStats, Path, bool]:
    """Statistics of a dataset (an ``rqvae.data`` spec), computed once and cached to a safetensors file
    (see :func:`reference_cache_entry`). Returns (stats, file, whether it came from the cache).
    A spec that is a ``.safetensors`` file is read as statistics directly (its network hash is checked)."""
    if spec.endswith(".safetensors"):
        stats, meta = FeatureStats.load(spec)
        if meta.get("network_sha256") not in (None, net.sha256):
            raise UserError(f"{spec} was computed with another Inception network (sha256 "
                            f"{str(meta.get('network_sha256'))[:12]}..., this one {net.sha256[:12]}...); "
                            "recompute the statistics with this network")
        return stats, Path(spec), True
    path, key = reference_cache_entry(spec, net, image_size, channels, split, count, seed, cache_dir)
    stats = load_cached_stats(path, key)
    if stats is not None:
        return stats, path, True
    ds = build_image_dataset(spec, image_size, channels, split=split)
    n = count if isinstance(ds, IterableDataset) else len(subset_indices(len(ds), count, seed))
    total = None if n is None else math.ceil(n / batch_size)
    stats = compute_stats(progress_bar(dataset_batches(ds, batch_size, count, seed), total, "reference stats",
                                    progress), net)
    stats.save(path, {"key": key, "network_sha256": net.sha256})
    return stats, path, False


def fid(generated: Iterable[torch.Tensor], reference: str, net: InceptionFeatures, image_size: int,
        split: str = "train", ref_count: int | None = None, batch_size: int = 50,
        cache_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """FID of generated image batches against a reference (data spec or statistics file)."""
    ref, ref_path, cached = reference_stats(reference, net, image_size, 3, split, ref_count, batch_size,
                                            cache_dir, progress=progress)
    value, gen = frechet_distance(generated, ref, net)
    return {"fid": value, "num_generated": gen.count, "num_reference": ref.count,
            "reference_stats": str(ref_path), "reference_cached": cached}
