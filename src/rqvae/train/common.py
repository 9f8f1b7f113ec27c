"""Pieces shared by the trainers: optimizer and LR schedule, gradient clipping, model EMA, the
non-finite-loss guard, bf16 autocast and logging (TensorBoard + tqdm + a JSONL metrics file).

The trainers (:mod:`rqvae.train.vae`, :mod:`rqvae.train.ar`) compose these with the model, the data
(:mod:`rqvae.data`), checkpoints (:mod:`rqvae.train.checkpoint`) and :mod:`rqvae.distributed`.
Gradient accumulation is a loop in the trainer: each of ``grad_accum`` micro-batches backpropagates
``loss / grad_accum`` and the gradients are averaged over ranks once, before the optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rqvae import distributed as dist
from rqvae.errors import UserError

log = logging.getLogger("rqvae.train.common")


# ---------------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels only (not biases, norms, embeddings' gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-4,
                    betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam (stage 1: lr 4e-5, betas (0.5, 0.9)) or AdamW (stage 2: lr 5e-4, betas (0.9, 0.95), wd 1e-4)."""
    name = name.lower()
    groups = param_groups(model, weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"unknown optimizer {name!r}; choose 'adam' or 'adamw'")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` ((step + 1) / warmup), then constant or cosine decay to ``min_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"unknown LR schedule {schedule!r}; choose 'constant' or 'cosine'")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    schedule: str = "constant", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_factor`. The factor function is a closure, so a resumed run uses the
    schedule of its own (possibly longer) ``total_steps``; the scheduler state keeps only the step."""
    lr_factor(0, warmup_steps, total_steps, schedule, min_ratio)  # validate the name now

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, schedule, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Total gradient 2-norm (before clipping), inf/nan if non-finite; clips to ``max_norm`` if > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float())
                                                          for p in params])))


# --------------------------------------------------------------------------------------- EMA
class ModelEMA(nn.Module):
    """Exponential moving average of a model's parameters: theta_ema <- d theta_ema + (1 - d) theta.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs get a
    useful average. Buffers (e.g. the EMA codebook, which is already an average) are copied as they are.
    It is an ``nn.Module``: checkpoint it like any other (``module.*`` and ``num_updates``).
    """

    num_updates: torch.Tensor

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(dist.unwrap(model)).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def train(self, mode: bool = True) -> ModelEMA:
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = dist.unwrap(model)
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    @contextlib.contextmanager
    def swap_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (for evaluation or saving)."""
        model = dist.unwrap(model)
        saved = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.module.parameters()):
                p.copy_(e)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)


# ------------------------------------------------------------------------- non-finite guard
class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses: the run stops (the last checkpoint stays as it was)."""


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are NaN/Inf, and stops after ``max_consecutive``.

    The quantizer updates its EMA codebook inside the forward pass (train mode), before the loss is known.
    So the trainer calls :meth:`snapshot` on the model before the forward passes of a step and, when
    :meth:`check` says the step is bad, :meth:`restore` puts the buffers back: a skipped step changes
    no weight, no optimizer state and no codebook. The flag is all-reduced so every rank skips together.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self._saved: dict[str, torch.Tensor] = {}

    def snapshot(self, *modules: nn.Module) -> None:
        """Remember the buffers (EMA codebook, BatchNorm statistics) of ``modules``."""
        self._saved = {(i, k): b.detach().clone() for i, m in enumerate(modules)
                       for k, b in dist.unwrap(m).named_buffers()}

    @torch.no_grad()
    def restore(self, *modules: nn.Module) -> None:
        """Put back the buffers of the same ``modules`` (in the same order) as at :meth:`snapshot`."""
        for i, m in enumerate(modules):
            for k, b in dist.unwrap(m).named_buffers():
                if (i, k) in self._saved:
                    b.copy_(self._saved[(i, k)])

    def check(self, *values: torch.Tensor | float, step: int, hint: str = "") -> bool:
        """True if all values are finite on every rank. Counts bad steps; raises after too many in a row."""
        bad = any(not math.isfinite(float(v)) if not isinstance(v, torch.Tensor)
                  else not bool(torch.isfinite(v.detach()).all()) for v in values)
        bad = dist.all_reduce_flag(bad)
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, %d in total)",
                    step, self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for {self.consecutive} steps in a row (last at step {step}); training "
                f"stopped. Lower the learning rate, disable --bf16 or check the data{hint}")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))


# ---------------------------------------------------------------------------------- autocast
def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 compute pays off on ``device``: CUDA with bf16 support, or a CPU with AMX tiles.

    On CPUs without them (AVX2-only, e.g. this project's CI machines) bf16 matmuls and convolutions are
    emulated and measured 10-80x slower than float32, so bf16 autocast is skipped there.
    """
    from rqvae.models.sampling import default_dtype

    return default_dtype(device) == torch.bfloat16


@functools.cache
def _warn_slow_bf16(device_type: str) -> None:
    logging.getLogger("rqvae.train.common").warning(
        "bf16 autocast requested, but this %s has no fast bf16 units (no AMX); training in float32",
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


# ----------------------------------------------------------------------------------- logging
class Logger:
    """Metrics to ``run_dir/metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars and
    images (``run_dir/tb``) and a tqdm progress bar, all on the main rank only.

    On resume from step ``start_step``, JSONL lines and TensorBoard events after ``start_step`` (written
    by the interrupted run after its last checkpoint) are dropped, so curves have no duplicates.
    """

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = True, progress: bool = True,
                 desc: str = "train") -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
            self.metrics_path.write_text("".join(s + "\n" for s in kept))
        elif start_step == 0 and self.metrics_path.exists():
            self.metrics_path.unlink()
        self._file = open(self.metrics_path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step or None)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def info(self, message: str) -> None:
        """A one-off message on the main rank (through tqdm so the bar is not torn)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            log.info(message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        if self._bar is not None:
            short = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss/")}
            self._bar.set_postfix(short, refresh=False)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: (C, H, W) in [-1, 1]."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, ((image.detach().float().cpu() + 1) / 2).clamp(0, 1), step)

    def advance(self, n: int = 1) -> None:
        if self.enabled and self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
