"""What every training run shares (:class:`TrainerConfig`) and what each task supplies (:class:`TrainTask`).

The :class:`~rqvae.train.trainer.Trainer` owns the loop; a task owns its models, losses and data:

=====================  =====================================================================================
``prepare(info)``      build the data (every problem a user can cause surfaces here, before any model)
``build(info)``        models, optimizers, schedulers; fill ``model``, ``modules``, ``optimizers``,
                       ``schedulers`` (the trainer seeds the RNG with ``cfg.seed`` just before)
``batches(start)``     an endless iterator of micro-batches starting at micro-batch ``start``
``train_step(...)``    forward and backward of one micro-batch; returns detached loss tensors ``loss/*``
``sample(step)``       an image grid (C, H, W) in [-1, 1] for ``RUN/samples/step_{step:07d}.png``, or None
``save_final(dir)``    write the trained model (main rank, once the run reached ``cfg.steps``)
=====================  =====================================================================================

Optional hooks: ``active_optimizers(step)`` (which optimizers step, e.g. the discriminator only after
``disc_start``), ``log_extras(means)`` (task metrics at log time), ``extra_state()`` /
``load_extra_state(extra, path)`` (checkpoint metadata), ``describe()`` (start-up lines) and
``validate(step)`` (metrics on held-out data, called after every step; a task returns ``val/*`` metrics at
its validation steps and None otherwise); ``copy_model()`` (a frozen copy for the EMA and the best model; an
FSDP task builds a sharded twin, as FSDP modules cannot be deep-copied). A task that sets ``val_metric``
(lower is better) gets the best model tracking and early stopping of :mod:`rqvae.train.validation`;
``save_final(run_dir, name)`` then writes ``RUN/model-last`` (final) and ``RUN/model`` (best). A task whose
model is sharded over the ranks (``sharded``, :mod:`rqvae.train.fsdp`) gets ``sample`` and ``save_final``
called on every rank (they gather the weights; only rank 0's grid is written) and checkpoints written by
every rank.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rqvae import distributed as dist
from rqvae.config import option
from rqvae.distributed import DistInfo
from rqvae.errors import UserError


@dataclass(kw_only=True)
class TrainerConfig:
    """Options of the training loop, shared by every training command (tasks may change defaults)."""

    run_dir: str = option(help="run folder: checkpoints/, model/ (with validation: the best model, and "
                               "model-last/ the final one), samples/, metrics.jsonl, tb/", flag="--out")
    steps: int = option(1000, "optimizer steps in total (a resumed run continues up to this)")
    stop_after: int | None = option(None, "end this invocation after this step with a checkpoint "
                                          "(continue with --resume)")
    batch_size: int = option(32, "images per process and micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    grad_clip: float = option(0.0, "max gradient norm (0: off)")
    bf16: bool = option(False, "bf16 autocast where it is measured faster (CUDA; CPUs with AMX or AVX-512 "
                               "bf16, timed once per machine); float32 elsewhere")
    ema_decay: float | None = option(None, "keep an EMA of the weights; the final model is the EMA model",
                                     flag="--ema", metavar="DECAY")
    checkpoint_every: int = option(500, "steps between checkpoints (0: no checkpoints)")
    keep_last: int = option(3, "checkpoints to keep")
    log_every: int = option(50, "steps between metrics lines")
    sample_every: int = option(500, "steps between sample grids (0: only at the end)")
    seed: int = option(0, "random seed")
    resume: bool = option(False, "continue the interrupted run in --out from its latest checkpoint (weights, "
                                 "optimizer, schedule, data position); to start a new run from a trained "
                                 "model use --init-from where the command has it")
    max_nonfinite: int = option(5, "stop after this many NaN/Inf steps in a row")
    device: str | None = option(None, "default: CUDA if available", choices=("cpu", "cuda"))
    progress: bool = option(True, "progress output (a bar on a terminal, a line every 30 s otherwise)")
    tensorboard: bool = option(True, "TensorBoard logs in RUN/tb")

    def end_step(self) -> int:
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)

    def validate(self) -> None:
        """Refuse impossible values with a one-line :class:`UserError` (tasks extend this)."""
        checks = [
            (self.steps >= 0, f"--steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.sample_every >= 0, f"--sample-every must be >= 0, got {self.sample_every}"),
            (self.max_nonfinite >= 1, f"--max-nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1,
             f"--ema must be in (0, 1), got {self.ema_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def config_json(cfg: Any) -> Any:
    """A dataclass config as plain JSON values (tuples become lists), for checkpoint metadata."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class TrainTask:
    """Base of the per-task objects (see the module docstring). Subclasses set ``name`` and implement
    ``build``, ``batches`` and ``train_step``; the rest have defaults."""

    name = "train"
    model: nn.Module  # the model being trained: EMA'd, checked across ranks and returned by the trainer
    modules: dict[str, nn.Module]  # everything checkpointed whose buffers a step may change
    optimizers: dict[str, torch.optim.Optimizer]  # the first one is the main one (lr, grad_norm)
    schedulers: dict[str, Any]
    val_metric: str | None = None  # the validation metric to keep the best model by (lower is better)
    sharded: bool = False  # the model is sharded over the ranks (FSDP)

    def prepare(self, info: DistInfo) -> None:
        """Build the data (before the models; a user's mistake raises UserError here)."""

    def build(self, info: DistInfo) -> None:
        raise NotImplementedError

    def batches(self, start: int) -> Iterator[Any]:
        raise NotImplementedError

    def train_step(self, batch: Any, *, step: int, micro: int, scale: float) -> dict[str, torch.Tensor]:
        """Forward and backward (of ``loss * scale``) of one micro-batch; ``micro`` counts micro-batches
        over the whole run. Returns detached tensors: ``loss/total`` and other ``loss/*`` terms (checked
        for NaN/Inf) and any other statistics to average into the logs."""
        raise NotImplementedError

    def copy_model(self) -> nn.Module:
        """A frozen copy of the model, in eval mode (the EMA weights, the best model)."""
        return copy.deepcopy(dist.unwrap(self.model)).eval().requires_grad_(False)

    def active_optimizers(self, step: int) -> list[str]:
        return list(self.optimizers)

    def log_extras(self, means: dict[str, float]) -> dict[str, float]:
        return {}

    def sample(self, step: int) -> torch.Tensor | None:
        return None

    def validate(self, step: int) -> dict[str, float] | None:
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any], path: Path) -> None:
        """Check checkpoint metadata against this run (e.g. the model config)."""
        saved = extra.get("model_config")
        mine = self.extra_state().get("model_config")
        if saved is not None and mine is not None and saved != mine:
            raise UserError(f"the checkpoint {path} was trained with a different model config; resume with "
                            "the same --preset/--model-config options or choose a new --out folder")

    def describe(self, world_size: int) -> list[str]:
        return []

    def save_final(self, run_dir: Path | None, name: str = "model") -> None:
        """Write the model to ``run_dir / name``."""
