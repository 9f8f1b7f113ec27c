"""Sampling helpers: temperature, top-k, top-p (nucleus), classifier-free guidance, per-depth settings.

All filters act on logits (B, K) and return logits with the removed entries set to -inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from rqvae.errors import UserError
from rqvae.models.step_linear import step_dtype

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


@dataclass
class Sampler:
    """The sampling settings of one ``generate`` call, one value per depth, and classifier-free guidance.

    With ``cfg_scale != 1`` the model runs the conditional batch (rows 0..B-1) and the null-conditional
    batch (rows B..2B-1) together; :meth:`draw` guides, samples B codes and repeats them for both halves.
    Both samplers (reference and optimised) draw through it, so they consume the generator identically.
    """

    batch_size: int  # B, the images asked for
    temperatures: list[float]
    top_ks: list[int | None]
    top_ps: list[float | None]
    cfg_scale: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def build(cls, depth: int, batch_size: int, *, temperature: float | Sequence[float] = 1.0,
              top_k: int | Sequence[int | None] | None = None,
              top_p: float | Sequence[float | None] | None = None, cfg_scale: float = 1.0,
              generator: torch.Generator | None = None) -> Sampler:
        temps = per_depth(temperature, depth, "temperature")
        for t in temps:
            if t is None or t <= 0:
                raise UserError(f"temperature must be > 0, got {t}")
        return cls(batch_size, temps, per_depth(top_k, depth, "top_k"), per_depth(top_p, depth, "top_p"),
                   cfg_scale, generator)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def draw(self, logits: torch.Tensor, d: int) -> torch.Tensor:
        """Codes at depth d from logits (Bx, K) -> (Bx,); Bx = 2B when guided (same code in both halves)."""
        logits = logits.float()
        if self.guided:
            B = self.batch_size
            logits = guide(logits[:B], logits[B:], self.cfg_scale)  # (B, K)
        code = sample_from_logits(logits, self.temperatures[d], self.top_ks[d], self.top_ps[d],
                                  self.generator)
        return torch.cat([code, code]) if self.guided else code


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Compute dtype for sampling: bf16 on CUDA with bf16 support; on a CPU the dtype in which the sampler's
    linear of a typical shape (64 rows, 512 -> 2048) measured faster on this machine (bf16 on CPUs with
    AMX or AVX-512 bf16 instructions, fp32 on AVX2-only CPUs, which emulate bf16 10-80x slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return step_dtype(2048, 512, 64)
    return torch.float32
