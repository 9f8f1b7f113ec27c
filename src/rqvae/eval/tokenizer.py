"""Scoring a tokenizer (RQ-VAE): reconstruction error per depth, code usage and rFID."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import IterableDataset

from rqvae.data.build import build_image_dataset
from rqvae.errors import UserError
from rqvae.eval.batches import dataset_batches, progress_bar, subset_indices
from rqvae.eval.fid import FeatureStats, fid_metric, load_cached_stats, reference_cache_entry
from rqvae.eval.inception import InceptionFeatures


class _ReconScores:
    """Running MSE (images in [-1, 1]), PSNR and SSIM (torchmetrics, images in [0, 1]) per depth."""

    def __init__(self, depths: list[int]):
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure  # slow import

        self.psnr = {d: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for d in depths}
        self.ssim = {d: StructuralSimilarityIndexMeasure(data_range=1.0) for d in depths}
        self.sq_err = dict.fromkeys(depths, 0.0)

    def update(self, d: int, rec: torch.Tensor, x: torch.Tensor) -> None:
        self.sq_err[d] += float((rec - x).pow(2).mean(dim=(1, 2, 3)).sum())
        self.psnr[d].update((rec.cpu() + 1) / 2, (x.cpu() + 1) / 2)
        self.ssim[d].update((rec.cpu() + 1) / 2, (x.cpu() + 1) / 2)

    def result(self, seen: int) -> list[dict[str, float]]:
        return [{"depth": d, "mse": self.sq_err[d] / seen, "psnr": float(self.psnr[d].compute()),
                 "ssim": float(self.ssim[d].compute())} for d in self.sq_err]


class _RFID:
    """FID between images and their reconstructions; the images' statistics are cached like any reference,
    so a second evaluation runs the network only on the reconstructions."""

    def __init__(self, net: InceptionFeatures, data: str, image_size: int, channels: int, split: str,
                 count: int | None, seed: int, cache_dir: str | os.PathLike | None,
                 resize_mode: str = "crop"):
        self.net, self.metric = net, fid_metric(net)
        self.path, self.key = reference_cache_entry(data, net, image_size, channels, split, count, seed,
                                                    cache_dir)
        if resize_mode != "crop":  # other pixels from the same files: another cache entry
            self.key["resize_mode"] = resize_mode
            self.path = self.path.with_name(f"{self.path.stem}-{resize_mode}{self.path.suffix}")
        ref = load_cached_stats(self.path, self.key)
        self.cached = ref is not None
        if ref is not None:
            ref.load_into(self.metric, real=True)

    def update(self, x: torch.Tensor, rec: torch.Tensor) -> None:
        if not self.cached:
            self.metric.update(x, real=True)
        self.metric.update(rec, real=False)

    def result(self) -> dict[str, Any]:
        if not self.cached:
            FeatureStats.from_metric(self.metric, real=True).save(
                self.path, {"key": self.key, "network_sha256": self.net.sha256})
        return {"rfid": float(self.metric.compute()), "reference_stats": str(self.path),
                "reference_cached": self.cached}


def split_used(ds: Any, data: str) -> str:
    """The split a dataset actually read: its split folder (or Fashion-MNIST split), else "all images of
    DATA" (a folder without split sub-folders, WebDataset shards)."""
    used = getattr(ds, "split_used", getattr(ds, "split", None))
    return used or f"all images of {data}"


@torch.no_grad()
def evaluate_tokenizer(vae: nn.Module, data: str, split: str = "test", count: int | None = None,
                       batch_size: int = 50, depths: Iterable[int] | None = None, rfid: bool = True,
                       recon: bool = True, net: InceptionFeatures | None = None,
                       cache_dir: str | os.PathLike | None = None, seed: int = 0,
                       progress: bool = False, device: str | torch.device = "cpu",
                       resize_mode: str = "crop") -> dict[str, Any]:
    """Score an RQ-VAE on ``count`` images of a dataset split, in one pass:

    * ``recon``: per depth d, MSE (images in [-1, 1], as the training loss), PSNR and SSIM (torchmetrics,
      images in [0, 1], averaged per image) of X^(d) = G(sum_{i<=d} e(k_i)), plus code usage per depth
      (``quantizer.usage`` of the latents: codes used and perplexity);
    * ``rfid``: FID between the images and their full-depth reconstructions (reference statistics of
      the images are cached like :func:`rqvae.eval.fid.reference_stats`).

    ``resize_mode`` fits non-square images ("crop" or "pad"). The result's ``split`` is the split actually
    read: a folder without split sub-folders reports "all images of DIR".
    """
    cfg = vae.config
    D = cfg.depth
    depths = sorted(set(depths)) if depths is not None else list(range(1, D + 1))
    if not depths or depths[0] < 1 or depths[-1] > D:
        raise UserError(f"depths must be in 1..{D} for this model, got {depths}")
    if rfid and net is None:
        net = InceptionFeatures(device=device)
    vae = vae.eval().to(device)
    ds = build_image_dataset(data, cfg.image_size, cfg.in_channels, split=split, resize_mode=resize_mode)
    n = count if isinstance(ds, IterableDataset) else len(subset_indices(len(ds), count, seed))

    fid_acc = None
    if rfid:
        fid_acc = _RFID(net, data, cfg.image_size, cfg.in_channels, split, count, seed, cache_dir,
                        resize_mode)
    scores = _ReconScores(depths) if recon else None
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
            if scores is not None and d in scores.sq_err:
                scores.update(d, rec, x)
            if d == D and fid_acc is not None:
                fid_acc.update(x, rec)
        seen += x.shape[0]
    used = split_used(ds, data)
    if seen == 0:
        raise UserError(f"no images to evaluate in {data} ({used})")
    out: dict[str, Any] = {"data": data, "split": used, "num_images": seen}
    if resize_mode != "crop":
        out["resize_mode"] = resize_mode
    if scores is not None:
        out["per_depth"] = scores.result(seen)
        usage = vae.quantizer.usage(torch.cat(latents).to(device))
        out["code_usage"] = {"codebook_size": cfg.codebook_size, "used": usage.used,
                             "perplexity": usage.perplexity}
    if fid_acc is not None:
        out.update(fid_acc.result())
    return out
