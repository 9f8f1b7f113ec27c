"""The sampler's linear layer and its dtype choice: measured per shape, cached per machine, never the slower
one, and overridable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rqvae.models.sampling as sampling
import rqvae.models.step_linear as sl
from rqvae.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty choice cache under tmp_path, measurements replaced by ``times`` (counted)."""
    monkeypatch.setenv("RQVAE_CACHE", str(tmp_path))
    monkeypatch.delenv("RQVAE_MATMUL_DTYPE", raising=False)
    sl._choices.cache_clear()
    calls, times = [], {"fp32": 1.0, "bf16": 1.0}

    def fake(out_f, in_f, rows, gelu=None):
        calls.append((out_f, in_f, rows, gelu))
        return dict(times)
    monkeypatch.setattr(sl, "measure", fake)
    monkeypatch.setattr(sl, "onednn_linear_available", lambda: True)
    monkeypatch.setattr(sl, "_onednn_bf16_isa", lambda: True)
    yield calls, times
    sl._choices.cache_clear()


@pytest.mark.parametrize("fp32,bf16,want", [(1.0, 0.5, torch.bfloat16), (1.0, 2.0, torch.float32),
                                            (1.0, 0.95, torch.float32)])  # a near tie keeps fp32
def test_the_faster_dtype_is_chosen(fresh, fp32, bf16, want):
    calls, times = fresh
    times.update(fp32=fp32, bf16=bf16)
    assert sl.step_dtype(1024, 256, 8) == want
    assert sampling.default_dtype("cpu") == want


def test_measured_once_per_shape_and_kept_on_disk(fresh, tmp_path):
    calls, times = fresh
    times.update(bf16=0.5)
    for rows in (5, 8, 8):  # 5 rows share the measurement of 8
        assert sl.step_dtype(1024, 256, rows) == torch.bfloat16
    sl.step_dtype(1024, 256, 9, gelu="exact")
    assert calls == [(1024, 256, 8, None), (1024, 256, 16, "exact")]
    files = list((tmp_path / "matmul_dtype").glob("*.json"))
    assert len(files) == 1 and set(json.loads(files[0].read_text())) == {"8x256x1024", "16x256x1024+exact"}
    sl._choices.cache_clear()  # a new process: read from disk, nothing measured again
    times.update(bf16=5.0)
    assert sl.step_dtype(1024, 256, 8) == torch.bfloat16 and len(calls) == 2


def test_an_isa_restricted_process_measures_again(fresh, monkeypatch):
    """A process limited to AVX2 (ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS / ATEN_CPU_CAPABILITY) runs
    bf16 emulated, so it must not reuse the answer measured without the limit on the same CPU."""
    calls, times = fresh
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(var, raising=False)
    times.update(bf16=0.5)
    assert sl.step_dtype(1024, 256, 8) == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    sl._choices.cache_clear()  # a new process with the limit
    times.update(bf16=20.0)
    assert sl.step_dtype(1024, 256, 8) == torch.float32 and len(calls) == 2
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    unrestricted = sl.machine_key()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # ATEN_CPU_CAPABILITY
    assert sl.machine_key() != unrestricted


def test_environment_forces_a_dtype(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setenv("RQVAE_MATMUL_DTYPE", "bf16")
    assert sl.step_dtype(64, 64, 8) == torch.bfloat16
    monkeypatch.setenv("RQVAE_MATMUL_DTYPE", "fp32")
    assert sl.step_dtype(64, 64, 8) == torch.float32 and not calls
    monkeypatch.setenv("RQVAE_MATMUL_DTYPE", "fp16")
    with pytest.raises(UserError, match="RQVAE_MATMUL_DTYPE"):
        sl.step_dtype(64, 64, 8)


def test_without_onednn_fp32(fresh, monkeypatch):
    calls, times = fresh
    times.update(bf16=0.1)
    monkeypatch.setattr(sl, "onednn_linear_available", lambda: False)
    assert sl.step_dtype(64, 64, 8) == torch.float32 and not calls


def test_a_cpu_without_onednn_bf16_kernels_gets_fp32_unmeasured(fresh, monkeypatch):
    calls, times = fresh
    times.update(bf16=0.1)
    monkeypatch.setattr(sl, "_onednn_bf16_isa", lambda: False)  # an AVX2-only CPU
    assert sl.step_dtype(64, 64, 8) == torch.float32 and not calls
    torch.manual_seed(0)
    w, x = torch.randn(24, 16), torch.randn(3, 16)
    lin = sl.StepLinear(w, None, torch.bfloat16, 3)  # bf16 asked for anyway: aten's addmm, not oneDNN
    assert not lin.onednn and torch.allclose(lin(x).float(), x @ w.t(), atol=0.1)


def test_sampling_runs_on_a_cpu_limited_to_avx2(tmp_path):
    """oneDNN's bf16 linear raises on an AVX2-only CPU; auto sampling must pick fp32 there, not crash.
    The limit is set as such a CPU would have it: torch's kernels at AVX2, oneDNN and MKL capped at AVX2."""
    code = ("import torch; from tests.helpers.ar_fixtures import make; m = make('class');"
            "print(m.generate(torch.arange(2)).shape)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "RQVAE_CACHE": str(tmp_path)}
    env.pop("RQVAE_MATMUL_DTYPE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([2, 4, 4, 2])" in done.stdout


def test_real_measurement_returns_both_times():
    t = sl.measure(96, 32, 4, gelu="exact")
    assert set(t) == {"fp32", "bf16"} and all(0 < v < 1 for v in t.values())


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [None, "exact", "sigmoid"])
def test_step_linear_computes_the_layer(dt, gelu):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(5, 48)
    want = lin(x)
    if gelu == "exact":
        want = torch.nn.functional.gelu(want)
    elif gelu == "sigmoid":
        want = want * torch.sigmoid(1.702 * want)
    got = sl.StepLinear(lin.weight, lin.bias, dt, rows=5, gelu=gelu)(x)
    assert got.dtype == dt
    tol = 1e-5 if dt == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_auto_sampling_uses_the_measured_dtype_per_shape(fresh, monkeypatch):
    """generate(dtype=None) on a CPU: each linear in the dtype measured faster for its shape."""
    from tests.helpers.ar_fixtures import make

    calls, times = fresh
    times.update(bf16=0.5)
    seen = []
    init = sl.StepLinear.__init__
    monkeypatch.setattr(sl.StepLinear, "__init__", lambda self, w, b, dt, rows, gelu=None:
                        (init(self, w, b, dt, rows, gelu), seen.append(dt))[0])
    model = make("class")
    codes = model.generate(torch.arange(2), top_k=1)
    assert codes.shape == (2, *model.config.code_shape)
    assert seen and all(dt == torch.bfloat16 for dt in seen) and calls
