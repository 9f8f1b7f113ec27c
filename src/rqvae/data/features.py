"""A disk cache of the frozen RQ-VAE's encoder features, for training the RQ-Transformer (stage 2).

The tokenizer is frozen during stage 2, so the encoder output Z = E(X) (``RQVAE.encode_latent``, the
latent *before* quantization, (h, w, n_z) channels last) is computed once for the whole dataset and
stored as float16 safetensors. Training then draws fresh codes for each batch from these features
with the quantizer's soft labels (paper Sec. 3.2.3, Eq. 15)::

    Q_tau(k | r_{d-1}) = softmax_k( -||r_{d-1} - e(k)||^2 / tau ),   k_d ~ Q_tau(. | r_{d-1}),
    r_d = r_{d-1} - e(k_d)

so the image encoder never runs again and every epoch sees different stochastic codes.

A cache lives in ``cache_dir/<key>/`` (``features.safetensors``: ``latents`` (N, h, w, n_z) float16 and
``labels`` (N,) int64; ``captions.json`` for text data; ``meta.json``). The key hashes the VAE identity
(the SHA-256 of its ``model.safetensors``), the data spec, split, image size, channels, the dataset's
files (path, size, mtime where the dataset lists them), the captions and the augmentation, so a
different VAE or different data gives a new cache. With ``flip=True`` the features of horizontally
flipped images are stored as a second copy (rows N/2..N-1 mirror rows 0..N/2-1).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset

from rqvae import distributed as dist
from rqvae.data.cache import cache_dir as cache_dir_for
from rqvae.data.cache import data_fingerprint, dataset_files, dataset_length  # noqa: F401  dataset_files: API
from rqvae.data.loader import collate
from rqvae.errors import UserError
from rqvae.progress import progress as progress_output

FEATURES_NAME = "features.safetensors"
META_NAME = "meta.json"
CAPTIONS_NAME = "captions.json"
CACHE_VERSION = 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Cached encoder features; item i is ``{"latent": (h, w, n_z) float16, "label": int}``."""

    latents: torch.Tensor  # (N, h, w, n_z) float16
    labels: torch.Tensor  # (N,) int64
    captions: list[str] | None  # N captions (text data) or None
    meta: dict[str, Any]
    path: Path

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent": self.latents[i], "label": int(self.labels[i])}

    @property
    def code_hw(self) -> tuple[int, int]:
        return int(self.latents.shape[1]), int(self.latents.shape[2])


def _cache_meta(vae_dir: str | os.PathLike, data_spec: str, split: str, image_size: int, channels: int,
                ds: Any, flip: bool, captions: Sequence[str] | None) -> dict[str, Any]:
    weights = Path(vae_dir) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights} is missing; pass the folder of a trained RQ-VAE (with model.safetensors)")
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "vae_sha256": file_sha256(weights),
        "data_spec": str(data_spec),
        "split": split,
        "image_size": int(image_size),
        "channels": int(channels),
        "num_images": dataset_length(ds),
        "dataset_fingerprint": data_fingerprint(ds),
        "augmentation": "hflip" if flip else "none",
        "captions_sha256": None if captions is None else
        hashlib.sha256("\0".join(captions).encode()).hexdigest(),
    }
    return meta


def cache_key(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def _load(folder: Path) -> FeatureCache:
    tensors = load_file(str(folder / FEATURES_NAME))
    meta = json.loads((folder / META_NAME).read_text())
    captions = None
    if (folder / CAPTIONS_NAME).is_file():
        captions = json.loads((folder / CAPTIONS_NAME).read_text())
    return FeatureCache(tensors["latents"], tensors["labels"], captions, meta, folder)


def _loader(ds: Any, batch_size: int):

    if not isinstance(ds, IterableDataset) and not hasattr(ds, "__getitem__"):
        raise UserError("the dataset can be neither indexed nor iterated; build it with rqvae.data")
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=False,
                      collate_fn=collate)


@torch.no_grad()
def compute_features(vae: torch.nn.Module, ds: Any, batch_size: int = 64, flip: bool = False,
                     device: str | torch.device = "cpu", bf16: bool = False,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder over the dataset: latents (N or 2N, h, w, n_z) float16 and labels (N or 2N,)."""
    vae.eval()
    lat: list[torch.Tensor] = []
    lat_flip: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    if dataset_length(ds) is None and dist.get_world_size() > 1:
        raise UserError("a streamed (WebDataset) source is sharded by rank, so its feature cache must be "
                        "built by a single process: run train-ar once without torchrun with --steps 0 first")
    device = torch.device(device)
    use_amp = bf16 and device.type in ("cpu", "cuda")
    bar = progress_output(dataset_length(ds), "caching encoder features", progress, unit="img")
    for batch in _loader(ds, batch_size):
        images = batch["image"].to(device)  # (B, C, S, S) in [-1, 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            lat.append(vae.encode_latent(images).float().to(torch.float16).cpu())  # (B, h, w, n_z)
            if flip:
                lat_flip.append(vae.encode_latent(images.flip(-1)).float().to(torch.float16).cpu())
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long).reshape(-1).cpu())
        bar.update(images.shape[0])
    bar.close()
    if not lat:
        raise UserError("the dataset yielded no images to encode")
    latents = torch.cat(lat + lat_flip)
    labels_t = torch.cat(labels)
    if flip:
        labels_t = torch.cat([labels_t, labels_t])
    if not torch.isfinite(latents).all():
        raise UserError("the RQ-VAE produced non-finite (or float16-overflowing) encoder features; "
                        "check the VAE checkpoint")
    return latents, labels_t


def load_or_build_features(vae: torch.nn.Module, vae_dir: str | os.PathLike, ds: Any, *, data_spec: str,
                           split: str = "train", image_size: int, channels: int,
                           cache_dir: str | os.PathLike | None = None, flip: bool = False,
                           captions: Sequence[str] | None = None, batch_size: int = 64,
                           device: str | torch.device = "cpu", bf16: bool = False,
                           progress: bool = True) -> FeatureCache:
    """Return the cached features for (VAE, data, augmentation), computing and saving them if absent.

    Under ``torch.distributed`` only rank 0 computes and writes; the other ranks wait, then read.
    The cache folder is written under a temporary name and renamed into place, so an interrupted
    run never leaves a half-written cache behind.
    """
    if captions is not None and dataset_length(ds) is not None and len(captions) != len(ds):
        raise UserError(f"got {len(captions)} captions for {len(ds)} images; give one caption per image")
    cache_dir = cache_dir_for("features", cache_dir)
    meta = _cache_meta(vae_dir, data_spec, split, image_size, channels, ds, flip, captions)
    folder = cache_dir / cache_key(meta)
    if dist.is_main() and not (folder / META_NAME).is_file():
        latents, labels = compute_features(vae, ds, batch_size=batch_size, flip=flip, device=device,
                                           bf16=bf16, progress=progress)
        meta = {**meta, "num_items": int(latents.shape[0]), "latent_shape": list(latents.shape[1:])}
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, str(tmp / FEATURES_NAME))
        if captions is not None:
            caps = list(captions) * (2 if flip else 1)
            (tmp / CAPTIONS_NAME).write_text(json.dumps(caps))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completeness
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if not (folder / META_NAME).is_file():
        raise UserError(f"feature cache {folder} is missing after it was built; is --feature-cache on a "
                        "folder all ranks share?")
    return _load(folder)
