"""The linear layer of the optimised sampler, and the dtype it runs in: measured once per machine and shape.

A sampling step multiplies a few rows (the batch) by every weight of the model, so each matmul streams its
whole weight for a handful of rows. Which dtype is faster for that depends on the CPU and on the shape:

- AVX2-only CPUs emulate bf16: 10-80x slower than fp32;
- CPUs with AVX-512 bf16 instructions (e.g. AMD Zen 4) run oneDNN's bf16 linear ~1.1x (8 rows, width 256)
  to 2.2x (64 rows, width 512) faster than fp32 (measured);
- CPUs with AMX tiles are faster still at large shapes, but not always at 8 rows.

So :func:`step_dtype` times both dtypes on the exact shape, once, and keeps the answer in
``cache_root()/matmul_dtype/<machine>.json`` (the machine: CPU model and flags, torch version, threads).
``RQVAE_MATMUL_DTYPE=fp32`` or ``=bf16`` skips the measurement and forces one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from typing import ClassVar

import torch

from rqvae.data.cache import cache_dir
from rqvae.errors import UserError
from rqvae.models.transformer_blocks import activation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MARGIN = 1.1  # bf16 must be at least this much faster: a near tie keeps fp32 (exact, and no flapping)


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """True when this torch build has oneDNN's packed-weight linear ops (private API, may vanish)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


def onednn_bf16_available() -> bool:
    """True when oneDNN's linear can run bf16 on this CPU: it needs AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or
    AMX. On an AVX2-only CPU (or under ``ONEDNN_MAX_CPU_ISA=AVX2``) its bf16 weight reorder raises, and
    bf16 itself is emulated: fp32 there."""
    return onednn_linear_available() and _onednn_bf16_isa()


@functools.lru_cache(maxsize=1)
def _onednn_bf16_isa() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if probe is not None:
            return bool(probe())
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
        return True
    except RuntimeError:
        return False


class StepLinear:
    """x @ W^T + b (optionally then a GELU, "exact" or "sigmoid") for the few rows of one sampling step,
    in ``dt`` (input cast to it; output in it).

    On a CPU with oneDNN's packed-weight linear: bf16 weights take it where oneDNN has bf16 kernels for the
    CPU (:func:`onednn_bf16_available`; they use its bf16 instructions where aten's bf16 addmm does not);
    fp32 weights take it from ONEDNN_MIN_WEIGHT entries (1.1-1.25x faster than MKL's sgemm for 8 rows on an
    AVX2 CPU from 512 x 1536 up, slower below 256 x 1024, measured with weights rotating through the L3 cache
    as in sampling). The weight is reordered once into oneDNN's blocked layout for a batch of ``rows`` and
    the exact GELU is fused. Otherwise (and without the private op): one addmm on the transposed weight
    (in, out). A missing bias is a zero one (adding zeros changes no value).
    """

    ONEDNN_MIN_WEIGHT: ClassVar[int] = 2**19

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dt: torch.dtype, rows: int,
                 gelu: str | None = None) -> None:
        self.dtype = dt
        self.fused = gelu == "exact"
        self.act = None if gelu is None else activation(gelu)
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        big = weight.numel() >= self.ONEDNN_MIN_WEIGHT // (2 if self.fused else 1)
        self.onednn = weight.device.type == "cpu" and (
            (dt == torch.bfloat16 and onednn_bf16_available())
            or (dt == torch.float32 and big and onednn_linear_available()))
        if self.onednn:
            self.w = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dt).contiguous(), rows)
            self.b = bias.detach().to(dt).contiguous()
        else:
            self.w = weight.detach().t().to(dt).contiguous()  # (in, out)
            self.b = bias.detach().to(dt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        x = x.to(self.dtype)
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "gelu" if self.fused else "none", [],
                                                    "none" if self.fused else "")
        else:
            y = torch.addmm(self.b, x, self.w)
        return self.act(y) if self.act is not None and not (self.onednn and self.fused) else y


def machine_key() -> str:
    """CPU model, the flags that decide matmul speed, the instruction set torch's kernels dispatch to and the
    limits set on oneDNN's and MKL's (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``,
    ``MKL_ENABLE_INSTRUCTIONS``: a CPU restricted to AVX2 emulates bf16), torch version and thread count, as a
    short hash."""
    flags, model = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = " ".join(sorted(w for w in line.split() if w.startswith(("avx", "amx", "fma"))))
                    break
    except OSError:
        pass
    isa = "|".join([torch.backends.cpu.get_cpu_capability()]
                   + [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                      "MKL_ENABLE_INSTRUCTIONS") if v in os.environ])
    text = f"{model or platform.processor()}|{flags}|{isa}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _time_linear(lin: StepLinear, x: torch.Tensor) -> float:
    """Best process-CPU seconds per call over a few short batches (the first call warms up)."""
    lin(x)
    reps, best = 1, float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(reps):
            lin(x)
        dt = time.process_time() - t
        best = min(best, dt / reps)
        if dt < 2e-3:  # too short to time: more calls per batch
            reps *= 4
    return best


def measure(out_features: int, in_features: int, rows: int, gelu: str | None = None) -> dict[str, float]:
    """Seconds per call of the step linear in fp32 and in bf16 on random data of this shape."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5
    x = torch.randn(rows, in_features, generator=g)
    b = torch.zeros(out_features)
    times = {name: float("inf") for name in DTYPES}
    for _ in range(2):  # alternate, so both see the same machine load
        for name, dt in DTYPES.items():
            try:
                times[name] = min(times[name], _time_linear(StepLinear(w, b, dt, rows, gelu), x))
            except RuntimeError:  # a kernel this CPU lacks: that dtype is never chosen
                pass
    return times


class _Choices:
    """The measured choices of this machine: in memory, and in one JSON file under the cache root."""

    def __init__(self) -> None:
        self.path = cache_dir("matmul_dtype") / f"{machine_key()}.json"
        try:
            self.table: dict[str, dict[str, float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.table = {}

    def get(self, key: str, measure_times: Callable[[], dict[str, float]]) -> dict[str, float]:
        """The times stored under ``key``, measured (and stored) first if missing."""
        if key not in self.table:
            self.table[key] = measure_times()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(self.table, indent=0, sort_keys=True))
                os.replace(tmp, self.path)
            except OSError:  # a read-only cache: measure again next process
                pass
        return self.table[key]


@functools.lru_cache(maxsize=1)
def _choices() -> _Choices:
    return _Choices()


def forced_dtype() -> torch.dtype | None:
    """``RQVAE_MATMUL_DTYPE`` (fp32 / bf16), or None to measure."""
    value = os.environ.get("RQVAE_MATMUL_DTYPE", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in DTYPES:
        raise UserError(f"RQVAE_MATMUL_DTYPE={value!r} is not one of auto, fp32, bf16; unset it or pick one")
    return DTYPES[value]


def step_dtype(out_features: int, in_features: int, rows: int, gelu: str | None = None) -> torch.dtype:
    """The faster dtype of a CPU step linear of this shape on this machine (bf16 only when it is at least
    BF16_MARGIN times faster than fp32); measured once, then read from the cache."""
    forced = forced_dtype()
    if forced is not None:
        return forced
    if not onednn_bf16_available():  # aten's bf16 addmm: fast only with AMX, which has oneDNN anyway
        return torch.float32
    rows = 1 << max(0, rows - 1).bit_length()  # one measurement per power of two
    key = f"{rows}x{in_features}x{out_features}" + (f"+{gelu}" if gelu else "")
    t = _choices().get(key, lambda: measure(out_features, in_features, rows, gelu))
    return faster(t)


def faster(times: dict[str, float]) -> torch.dtype:
    """bf16 when its time beats fp32's by BF16_MARGIN, else fp32."""
    return torch.bfloat16 if times["bf16"] * BF16_MARGIN < times["fp32"] else torch.float32


def measured(key: str, measure_times: Callable[[], dict[str, float]]) -> dict[str, float]:
    """{"fp32": s, "bf16": s} of this machine stored under ``key``, measured once with ``measure_times``."""
    return _choices().get(key, measure_times)
