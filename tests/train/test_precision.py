"""Training's bf16 autocast: on only where a measured training step is faster in bf16 (or CUDA)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import rqvae.train.precision as precision


@pytest.fixture
def timed(monkeypatch):
    """The machine's measured step times, set by the test; RQVAE_MATMUL_DTYPE unset."""
    monkeypatch.delenv("RQVAE_MATMUL_DTYPE", raising=False)
    times = {"fp32": 1.0, "bf16": 1.0}
    monkeypatch.setattr(precision, "measured", lambda key, fn: dict(times))
    return times


@pytest.mark.parametrize("bf16_s,fast", [(0.5, True), (0.95, False), (20.0, False)])
def test_bf16_only_where_measured_faster(timed, bf16_s, fast):
    timed["bf16"] = bf16_s
    assert precision.bf16_is_fast("cpu") is fast
    ctx = precision.autocast("cpu", enabled=True)
    assert isinstance(ctx, torch.autocast) is fast
    if not fast:
        assert isinstance(ctx, contextlib.nullcontext)
    assert isinstance(precision.autocast("cpu", enabled=False), contextlib.nullcontext)


def test_environment_forces_the_choice(timed, monkeypatch):
    timed["bf16"] = 0.1
    monkeypatch.setenv("RQVAE_MATMUL_DTYPE", "fp32")
    assert not precision.bf16_is_fast("cpu")
    monkeypatch.setenv("RQVAE_MATMUL_DTYPE", "bf16")
    assert precision.bf16_is_fast("cpu")


def test_meta_device_never_bf16(timed):
    timed["bf16"] = 0.1
    assert not precision.bf16_is_fast("meta")


def test_measurement_times_both():
    t = precision.measure_training_step(repeats=1)
    assert set(t) == {"fp32", "bf16"} and all(0 < v < 10 for v in t.values())
