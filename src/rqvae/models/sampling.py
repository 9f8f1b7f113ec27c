"""Sampling helpers: temperature, top-k, top-p (nucleus), classifier-free guidance, per-depth settings.

All filters act on logits (B, K) and return logits with the removed entries set to -inf.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

import torch

from rqvae.errors import UserError

V = TypeVar("V")


def per_depth(value: V | Sequence[V] | None, depth: int, name: str) -> list[V | None]:
    """A scalar -> the same value for every depth; a list/tuple -> one value per depth (length D)."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise UserError(f"{name} has {len(value)} values but the model has {depth} code depths; "
                            f"pass one value or {depth} values")
        return list(value)
    return [value] * depth  # type: ignore[list-item]


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept); k None or 0 keeps all."""
    if k is None or k == 0:
        return logits
    if k < 0:
        raise UserError(f"top_k must be a positive integer (or 0 for off), got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely entries whose probability sums to >= p.

    The most likely entry is always kept; p None or 1 keeps all.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise UserError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # (B, K)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the entries ranked above
    remove_sorted = mass_before >= p  # the first entry has mass_before 0 < p: always kept
    remove = torch.zeros_like(remove_sorted).scatter_(-1, idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def guide(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: l_uncond + s * (l_cond - l_uncond); s = 1 gives the conditional logits."""
    return logits_uncond + scale * (logits_cond - logits_uncond)


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of logits (B, K) -> (B,) int64 after temperature, top-k, then top-p."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, K)
    # inverse-CDF draw (one uniform per row; cheaper than torch.multinomial for small batches):
    # the first index whose CDF exceeds u * total never has zero probability
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """True when this CPU has AMX bf16 tiles (then bf16 matmuls are several times faster than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Compute dtype for sampling: bf16 on CUDA with bf16 support and on AMX CPUs, else fp32.

    Without AMX (AVX2-only CPUs) bf16 matmuls are emulated and much slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_amx() else torch.float32
    return torch.float32
