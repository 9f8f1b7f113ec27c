"""The one training loop: :class:`Trainer` runs any :class:`~rqvae.train.task.TrainTask`.

Per optimizer step: ``grad_accum`` micro-batches (forward + backward of ``loss / grad_accum``), one
gradient all-reduce per optimizer over the ranks, gradient clipping, the non-finite guard (a bad step
changes no weight, moment or buffer and is skipped on every rank), the optimizer and EMA updates and the
LR schedules. Around it: metrics (averaged over the steps between log lines, converted to Python numbers
only then), sample grids ``RUN/samples/step_{step:07d}.png``, checkpoints (:mod:`rqvae.train.checkpoint`)
and ``stop_after``. Resume restores weights, optimizer moments, schedules, RNG states and the data position,
so an interrupted and resumed single-process CPU run is bitwise identical to an uninterrupted one.

Ctrl-C or SIGTERM: the step in progress is rolled back (buffers, RNG), a checkpoint of the last completed
step is written atomically, the logs are closed and the KeyboardInterrupt goes on (``--resume`` continues).
A run that fails before its first step removes the run folder it created.

Validation (a task with a ``val_metric``, see :mod:`rqvae.train.validation`): the task's ``validate`` hook
runs on the weights that would be saved (the EMA weights with ``--ema``); the best model so far is kept
(and checkpointed, so resume stays exact); ``RUN/model/`` is the best model and ``RUN/model-last/`` the
final one; ``--early-stop P`` ends the run after P validations in a row without improvement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rqvae import distributed as dist
from rqvae.config import save_config
from rqvae.errors import UserError
from rqvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rqvae.train.ema import ModelEMA
from rqvae.train.guard import NonFiniteGuard
from rqvae.train.logger import Logger
from rqvae.train.optim import clip_grad_norm
from rqvae.train.task import TrainerConfig, TrainTask
from rqvae.train.validation import BestTracker

log = logging.getLogger("rqvae.train.trainer")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM during the block raise KeyboardInterrupt after it: an update is all-or-nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's kill) and SIGINT raise KeyboardInterrupt, so that both end with a checkpoint
    (SIGINT also when the process inherited it as ignored, as background jobs of a script do)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _rng_states() -> tuple[Any, ...]:
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if on_cuda else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_states(states: tuple[Any, ...]) -> None:
    cpu, cuda, npy, py = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(npy)
    random.setstate(py)


class Trainer:
    """Runs ``task`` as configured by ``cfg``: ``Trainer(cfg, task).train()`` returns the trained model."""

    def __init__(self, cfg: TrainerConfig, task: TrainTask) -> None:
        self.cfg, self.task = cfg, task
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else None
        self.step = self.start_step = 0
        self.end = cfg.end_step()
        self.ema: ModelEMA | None = None
        self.guard = NonFiniteGuard(cfg.max_nonfinite)
        self.logger: Logger | None = None
        self._rollback: tuple[dict, tuple[Any, ...]] | None = None  # set while a step is in progress
        self.tracker: BestTracker | None = None  # validation: the best value so far
        self.best: torch.nn.Module | None = None  # validation: the best model so far

    def train(self) -> torch.nn.Module:
        """Set up (or resume), loop to ``stop_after`` / ``steps``, save the final model; always closes the
        logs. A KeyboardInterrupt (Ctrl-C, SIGTERM) saves the last completed step first."""
        main = os.environ.get("RANK", "0") == "0"  # torchrun's rank: the process group is not up yet
        created = main and self.run_dir is not None and not self.run_dir.exists()
        done = False
        try:
            with _sigterm_as_interrupt():
                self._setup()
                while self.step < self.end:
                    parts = self._optimizer_step()
                    self._after_step(parts)
                self._finish()
                done = True
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
            if created and not done and self.step == 0 and self.run_dir.is_dir():
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing of value: all of it is this run's
        return self.task.model

    # ------------------------------------------------------------------------------------------ set-up
    def _checkpoints_on(self) -> bool:
        return self.run_dir is not None and self.cfg.checkpoint_every > 0

    def _latest(self) -> Path | None:
        if not self._checkpoints_on():
            return None
        latest = latest_checkpoint(self.run_dir) if self.run_dir.exists() else None
        started = (self.run_dir / "train_config.json").is_file()
        if latest is not None and not self.cfg.resume:
            raise UserError(f"{self.run_dir} already holds checkpoints (latest {latest.name}); pass --resume "
                            "to continue that run or choose a new --out folder")
        if latest is None and self.cfg.resume and not started:
            raise UserError(f"--resume: {self.run_dir} holds no run to continue (no checkpoint); drop "
                            "--resume to start a new run there, or point --out at the run folder")
        return latest

    def _setup(self) -> None:
        cfg, task = self.cfg, self.task
        cfg.validate()
        self.info = info = dist.init_distributed(cfg.device)
        latest = self._latest()
        task.prepare(info)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        task.build(info)
        self.modules = dict(task.modules)
        if cfg.ema_decay is not None:
            self.ema = self.modules["ema"] = ModelEMA(task.model, cfg.ema_decay, module=task.copy_model())
        if task.val_metric is not None:
            self.tracker = BestTracker(task.val_metric, getattr(cfg, "early_stop", None))
            self.best = task.copy_model()
            self.modules["best"] = self.best
        if latest is not None:
            extra = load_checkpoint(latest, self.modules, task.optimizers, task.schedulers)
            task.load_extra_state(extra, latest)
            self.step = self.start_step = int(extra["step"])
            self.guard.load_state_dict(extra.get("nonfinite", {}))
            if self.tracker is not None and "best" in extra:
                self.tracker.load_state_dict(extra["best"])
                if self.tracker.should_stop:  # the run had stopped early: only the final models are left
                    self.end = self.step
        if info.rank > 0:  # the checkpoint holds rank 0's RNG state; other ranks get their own streams
            torch.manual_seed(cfg.seed * 1000 + info.rank + self.step)
        self.logger = Logger(self.run_dir, cfg.steps, start_step=self.step, enabled=info.is_main,
                             tensorboard=cfg.tensorboard, progress=cfg.progress, desc=task.name)
        if info.is_main:
            if self.run_dir is not None:
                save_config(cfg, self.run_dir / "train_config.json")
            for line in task.describe(info.world_size):
                self.logger.info(line)
            if latest is not None:
                self.logger.info(f"resumed from {latest} at step {self.step}")
            elif cfg.resume and self._checkpoints_on():
                self.logger.info(f"no complete checkpoint in {self.run_dir} yet: starting at step 0")
        # A DataLoader iterator draws its base seed from the global RNG; keep that draw out of the training
        # RNG stream so a resumed run continues with exactly the RNG state of the checkpoint.
        with torch.random.fork_rng(devices=[]):
            self.batches = iter(task.batches(self.step * cfg.grad_accum))
        self._window: dict[str, Any] = {"sums": {}, "ok": 0, "steps": 0, "data_s": 0.0,
                                        "t": time.perf_counter()}

    # -------------------------------------------------------------------------------------------- step
    def _optimizer_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step; returns its averaged loss terms and grad norm, or None if it was skipped."""
        cfg, task, step = self.cfg, self.task, self.step
        names = task.active_optimizers(step)
        self.guard.snapshot(*task.modules.values())
        self._rollback = (task.modules, _rng_states())
        for opt in task.optimizers.values():
            opt.zero_grad(set_to_none=True)
        parts: dict[str, torch.Tensor] = {}
        for i in range(cfg.grad_accum):
            t = time.perf_counter()
            batch = next(self.batches)
            self._window["data_s"] += time.perf_counter() - t  # waiting for data, logged as time/data_s
            out = task.train_step(batch, step=step, micro=step * cfg.grad_accum + i,
                                  scale=1.0 / cfg.grad_accum)
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        norms = []
        for name in names:
            params = [p for g in task.optimizers[name].param_groups for p in g["params"]]
            dist.all_reduce_grads(params)
            norms.append(clip_grad_norm(params, cfg.grad_clip))
        losses = [v for k, v in parts.items() if k.startswith("loss/")]
        hint = f"; the last checkpoint in {self.run_dir / 'checkpoints'} is intact (continue with --resume)" \
            if self._checkpoints_on() else ""
        ok = self.guard.check(*losses, *norms, step=step, hint=hint)
        main_opt = next(iter(task.optimizers.values()))
        self._lr = main_opt.param_groups[0]["lr"]
        with _interrupts_deferred():  # all of the update, or none of it
            if ok:
                for name in names:
                    task.optimizers[name].step()
                if self.ema is not None:
                    self.ema.update(task.model)
            else:
                self.guard.restore(*task.modules.values())  # no weight, moment or buffer change
            for sched in task.schedulers.values():
                sched.step()
            self.step += 1
            self._rollback = None
        self.logger.advance()
        return {**parts, "grad_norm": norms[0]} if ok and norms else (parts if ok else None)

    def _after_step(self, parts: dict[str, torch.Tensor] | None) -> None:
        cfg, step = self.cfg, self.step
        w = self._window
        w["steps"] += 1
        if parts is not None:
            w["ok"] += 1
            for k, v in parts.items():
                w["sums"][k] = w["sums"].get(k, 0.0) + v
        if parts is not None and "loss/total" in parts:
            self.logger.progress_loss(parts["loss/total"])
        if step % cfg.log_every == 0 or step == self.end:
            self._log()
        self._validate(step)
        if (cfg.sample_every > 0 and step % cfg.sample_every == 0) or step == cfg.steps:
            self._sample()
        if self._checkpoints_on() and (step % cfg.checkpoint_every == 0 or step == self.end):
            self._save()
            dist.barrier()

    def _log(self) -> None:
        w, now = self._window, time.perf_counter()
        keys = sorted(w["sums"])
        sums = [torch.as_tensor(w["sums"][k]).float().cpu() for k in keys]
        values = torch.stack(sums).tolist() if keys else []  # the window's one host sync
        means = dist.all_reduce_mean({k: v / max(1, w["ok"]) for k, v in zip(keys, values)})
        means.update(self.task.log_extras(means))
        elapsed = max(now - w["t"], 1e-9)
        images = w["steps"] * self.cfg.batch_size * self.cfg.grad_accum * self.info.world_size
        means.update({"lr": self._lr, "nonfinite_steps": self.guard.total,
                      "time/step_s": elapsed / w["steps"], "time/data_s": w["data_s"] / w["steps"],
                      "perf/images_per_s": images / elapsed})
        self.logger.scalars(self.step, means)
        self._window = {"sums": {}, "ok": 0, "steps": 0, "data_s": 0.0, "t": now}

    def _validate(self, step: int) -> None:
        """The task's held-out metrics (on the weights that would be saved), the best model, early stop."""
        task, tracker = self.task, self.tracker
        swap = self.ema.swap_in(task.model) if self.ema is not None and tracker is not None \
            else contextlib.nullcontext()
        with swap, torch.random.fork_rng(devices=[]):  # validation draws nothing from the training RNG
            metrics = task.validate(step)
            improved = bool(metrics) and tracker is not None and tracker.update(step, metrics)
            if improved:
                self.best.load_state_dict(dist.unwrap(task.model).state_dict())
        if not metrics:
            return
        self.logger.scalars(step, metrics)
        if tracker is None or tracker.metric not in metrics:
            return
        note = "best so far" if improved else f"best {tracker.best:.5g} at step {tracker.best_step}"
        value = metrics[tracker.metric]
        self.logger.info(f"validation at step {step}: {tracker.metric} {value:.5g} ({note})")
        if tracker.should_stop and self.step < self.end:
            self.logger.info(f"early stop at step {step}: {tracker.metric} did not improve in "
                             f"{tracker.patience} validations (best at step {tracker.best_step})")
            self.end = self.step

    def _sample(self) -> None:
        if not (self.info.is_main or self.task.sharded):  # a sharded model is gathered by every rank
            return
        grid = self.task.sample(self.step)
        if grid is None or not self.info.is_main:
            return
        self.logger.image(self.step, "samples", grid)
        if self.run_dir is not None:
            from rqvae.data.images import save_image  # PIL, only when a grid is written

            save_image(grid, self.run_dir / "samples" / f"step_{self.step:07d}.png")

    # ------------------------------------------------------------------------------- checkpoint / end
    def _save(self) -> None:
        if self.info.is_main or self.task.sharded:  # sharded: every rank writes its pieces
            extra = {**self.task.extra_state(), "step": self.step, "nonfinite": self.guard.state_dict()}
            if self.tracker is not None:
                extra["best"] = self.tracker.state_dict()
            save_checkpoint(self.run_dir, self.step, self.modules, self.task.optimizers, self.task.schedulers,
                            extra, keep_last=self.cfg.keep_last)

    def _save_on_interrupt(self) -> None:
        """Roll back a step in progress and save the last completed step (no collective: other ranks may
        be gone). Nothing to do before the first step or without checkpoints."""
        if self._rollback is not None:
            modules, rng = self._rollback
            self.guard.restore(*modules.values())
            _set_rng_states(rng)
            self._rollback = None
        if self.logger is None or not self._checkpoints_on() or self.step <= self.start_step:
            return
        if self.task.sharded:  # every rank would have to take part, and some may be gone already
            self.logger.info(f"interrupted at step {self.step}: a sharded (--fsdp) run continues with "
                             f"--resume from its last periodic checkpoint in {self.run_dir / 'checkpoints'}")
            return
        with _interrupts_deferred():
            self._save()
        self.logger.info(f"interrupted: saved step {self.step} to {self.run_dir / 'checkpoints'}; "
                         "continue with --resume")

    def _finish(self) -> None:
        tracker, task = self.tracker, self.task
        stopped_early = tracker is not None and tracker.should_stop
        if self.step < self.cfg.steps and not stopped_early:  # stop_after: the checkpoint is the result
            self.logger.info(f"stopped at step {self.step} of {self.cfg.steps}; continue with --resume")
            return
        dist.check_same_across_ranks(task.model, task.name)  # weights and buffers agree
        if self.ema is not None:
            self.ema.copy_to(task.model)
        saves = self.info.is_main or task.sharded  # a sharded model is gathered by every rank
        if tracker is None:
            if saves:
                task.save_final(self.run_dir)
        else:  # model-last/: the final weights; model/: the best on the validation data
            if saves:
                task.save_final(self.run_dir, "model-last")
            if tracker.best_step >= 0:
                dist.unwrap(task.model).load_state_dict(self.best.state_dict())
            if saves:
                task.save_final(self.run_dir, "model")
                self.logger.info(f"model/: the best model on the validation data (step {tracker.best_step}, "
                                 f"{tracker.metric} {tracker.best:.5g}); model-last/: step {self.step}")
        dist.barrier()
