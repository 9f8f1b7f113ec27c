"""bf16 autocast, used only where bf16 compute is fast (else float32)."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from rqvae.models.sampling import cpu_has_amx

log = logging.getLogger("rqvae.train.precision")


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 compute pays off on ``device``: CUDA with bf16 support, or a CPU with AMX tiles.

    On AVX2-only CPUs bf16 matmuls and convolutions are emulated and measured 10-80x slower than float32,
    so bf16 autocast is skipped there. CPUs with AVX-512 bf16 instructions but no AMX run the sampler's
    linears faster in bf16 (see :mod:`rqvae.models.step_linear`), but training (convolutions, backward)
    was not measured to gain there, so it stays float32 on them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_amx()


@functools.cache
def _warn_slow_bf16(device_type: str) -> None:
    log.warning("bf16 autocast requested, but this %s has no fast bf16 units (no AMX); training in float32",
                device_type)


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA (a no-op context when disabled or when bf16 would be slower)."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    if not bf16_is_fast(device):
        _warn_slow_bf16(device.type)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
