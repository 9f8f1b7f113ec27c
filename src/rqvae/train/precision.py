"""bf16 autocast, used only where bf16 compute is fast (else float32)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch

from rqvae.models.step_linear import faster, forced_dtype, measured
from rqvae.models.vae import ResnetBlock

log = logging.getLogger("rqvae.train.precision")


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 autocast pays off for training on ``device``: CUDA with bf16 support; on a CPU, whether a
    small training step (a ResNet block and an MLP, forward and backward) ran at least 1.1x faster under bf16
    autocast than in float32, measured once per machine (cached with the sampler's measurements,
    :mod:`rqvae.models.step_linear`).

    AVX2-only CPUs emulate bf16 (10-80x slower): float32 there. CPUs with AMX or AVX-512 bf16 instructions
    (e.g. AMD Zen 4) gain: there a stage-1 step measured 1.7x faster (docs/benchmarks.md).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = forced_dtype()
    if forced is not None:
        return forced == torch.bfloat16
    return faster(measured("train-step", measure_training_step)) == torch.bfloat16


def measure_training_step(repeats: int = 3) -> dict[str, float]:
    """Best CPU seconds of one forward + backward of a ResNet block (64 channels, 16 x 16, batch 8) and a
    two-layer MLP (256 rows, 256 -> 1024 -> 256), in float32 and under bf16 autocast, alternating."""
    g = torch.Generator().manual_seed(0)
    block = ResnetBlock(64, 64)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x, h = torch.randn(8, 64, 16, 16, generator=g), torch.randn(256, 256, generator=g)

    def step(bf16: bool) -> float:
        t = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = block(x).float().square().mean() + mlp(h).float().square().mean()
        loss.backward()
        return time.process_time() - t
    times = {"fp32": float("inf"), "bf16": float("inf")}
    for name in times:  # warm-up (kernel selection, weight reorders)
        step(name == "bf16")
    for _ in range(repeats):
        for name in times:
            times[name] = min(times[name], step(name == "bf16"))
    return times


@functools.cache
def _warn_slow_bf16(device_type: str) -> None:
    log.warning("bf16 autocast requested, but bf16 is not faster on this %s (measured); training in float32",
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
