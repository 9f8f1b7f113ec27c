"""Held-out metrics of both stages (deterministic: eval mode, greedy codes, no random draws).

Stage 1 (:func:`vae_metrics`): ``val/loss_rec`` (MSE of the full reconstruction, images in [-1, 1]),
``val/psnr_d1..D`` (PSNR of the reconstruction from the first d codes, from the mean MSE over the set) and
``val/codes_used_d1..D`` (distinct codes chosen at depth d over the set).

Stage 2 (:func:`ar_bits`): ``val/bits_d1..D``, the negative log-likelihood in bits per code of the greedy
RQ codes at depth d given the condition, the earlier positions and the shallower codes (teacher forcing),
and ``val/bits``, their mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from rqvae.train.validation import per_depth


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RQ-Transformer's forward output -> (image logits (B, T, D, K), text logits (B, L-1, V) or None)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return out.logits, getattr(out, "cond_logits", None)


@torch.no_grad()
def vae_metrics(vae: Any, batches: Iterable[torch.Tensor], device: torch.device | str) -> dict[str, float]:
    """Stage-1 validation metrics of ``vae`` on image batches (B, C, S, S); the train/eval mode is kept."""
    was_training = vae.training
    vae.eval()
    D, K = vae.config.depth, vae.config.codebook_size
    sse = torch.zeros(D, dtype=torch.float64)  # squared error of the depth-d reconstruction
    counts = torch.zeros(D, K, dtype=torch.long)
    n_values = 0
    try:
        for x in batches:
            x = x.to(device).float()  # (B, C, S, S)
            codes = vae.quantizer.encode(vae.encode_latent(x))  # (B, h, w, D)
            for d in range(1, D + 1):
                sse[d - 1] += float(((vae.decode(codes, depth=d).float() - x) ** 2).sum())
            counts += torch.stack([torch.bincount(codes[..., d].reshape(-1).cpu(), minlength=K)
                                   for d in range(D)])
            n_values += x.numel()
    finally:
        vae.train(was_training)
    mse = (sse / max(1, n_values)).tolist()
    return {"val/loss_rec": mse[-1], **per_depth("val/psnr", [psnr_from_mse(m) for m in mse]),
            **per_depth("val/codes_used", (counts > 0).sum(1).tolist())}


@torch.no_grad()
def ar_bits(model: Any, quantizer: Any, latents: torch.Tensor, conds: torch.Tensor, *, batch_size: int,
            device: torch.device | str) -> dict[str, float]:
    """Stage-2 validation NLL in bits per code of the greedy codes of ``latents`` (N, h, w, n_z) under
    conditions ``conds`` (N,) or (N, L); the model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    D = model.config.depth
    nats = torch.zeros(D, dtype=torch.float64)
    n = 0
    try:
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].to(device=device, dtype=torch.float32)  # (B, h, w, n_z)
            codes = quantizer.encode(z)  # (B, h, w, D) greedy RQ
            logits, _ = split_output(model(codes, conds[i:i + batch_size].to(device)))  # (B, T, D, K)
            logp = F.log_softmax(logits.float(), dim=-1)
            target = codes.reshape(codes.shape[0], -1, D, 1)  # (B, T, D, 1)
            nats += -logp.gather(-1, target).squeeze(-1).sum(dim=(0, 1)).double().cpu()
            n += codes.shape[0] * target.shape[1]
    finally:
        model.train(was_training)
    bits = (nats / max(1, n) / math.log(2)).tolist()
    return {**per_depth("val/bits", bits), "val/bits": sum(bits) / D}
