"""Training logs on the main rank: ``metrics.jsonl``, TensorBoard and progress output.

Progress goes to stderr: a tqdm bar when stderr is a terminal, otherwise (CI logs, ``make demo > log``)
one plain line every ``interval`` seconds and one at the end, e.g.
``train-vae step 400/2000 loss 0.0123 2.1 it/s``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO

import torch

from rqvae.progress import PlainProgress

log = logging.getLogger("rqvae.train.logger")


def _trim_metrics(path: Path, start_step: int) -> None:
    """On resume, drop lines after ``start_step`` (written after the last checkpoint) and torn lines."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    path.write_text("".join(s + "\n" for s in kept))


class Logger:
    """Metrics to ``run_dir/metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars and
    images (``run_dir/tb``) and progress output, all on the main rank only (``enabled``). Without a
    ``run_dir`` only the progress is shown.

    On resume from step ``start_step``, JSONL lines and TensorBoard events after ``start_step`` (written
    by the interrupted run after its last checkpoint) are dropped, so curves have no duplicates.
    """

    def __init__(self, run_dir: str | os.PathLike | None, total_steps: int, start_step: int = 0, *,
                 enabled: bool = True, tensorboard: bool = True, progress: bool = True, desc: str = "train",
                 stream: IO[str] | None = None, interval: float = 30.0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._file: IO[str] | None = None
        self._writer = None
        self._bar = None
        self._plain: PlainProgress | None = None
        self._loss_sum: torch.Tensor | None = None  # running sum of the per-step loss since the last refresh
        self._loss_n = 0
        self._postfix: dict[str, str] = {}
        self._t_postfix = 0.0
        if not enabled:
            return
        if self.run_dir is not None:
            self._open_files(start_step, tensorboard)
        stream = sys.stderr if stream is None else stream
        if progress and stream.isatty():
            from tqdm.auto import tqdm  # only for terminals

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                             file=stream)
        elif progress:
            self._plain = PlainProgress(total_steps, start_step, desc, stream, interval)
            self._plain.loss_source = self._running_loss

    def _open_files(self, start_step: int, tensorboard: bool) -> None:
        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            if start_step > 0:
                _trim_metrics(path, start_step)
            else:
                path.unlink()
        self._file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, optional output

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step or None)

    @property
    def closed(self) -> bool:
        return self._file is None and self._writer is None and self._bar is None and self._plain is None

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
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
            self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        loss = values.get("loss/total", next((v for k, v in values.items() if k.startswith("loss/")), None))
        if self._plain is not None and loss is not None:
            self._plain.loss = float(loss)
        if self._bar is not None:
            short = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss/")}
            if short:
                self._postfix = short
                self._bar.set_postfix(self._postfix, refresh=False)

    def progress_loss(self, loss: torch.Tensor) -> None:
        """The loss of one step, for the progress output: summed on its device (no host sync per step) and
        read once per refresh as the mean since the last one."""
        if self._bar is None and self._plain is None:
            return
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_n += 1

    def _running_loss(self) -> float | None:
        if self._loss_sum is None:
            return None
        value = float(self._loss_sum) / self._loss_n
        self._loss_sum, self._loss_n = None, 0
        return value

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: (C, H, W) in [-1, 1]."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, ((image.detach().float().cpu() + 1) / 2).clamp(0, 1), step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            now = time.perf_counter()
            if now - self._t_postfix >= 0.5 and self._loss_sum is not None:  # at most two reads a second
                self._t_postfix = now
                self._postfix = {**self._postfix, "loss": f"{self._running_loss():.4g}"}
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
        elif self._plain is not None:
            self._plain.update(n)

    def close(self) -> None:
        """Close every output (idempotent): the metrics file, TensorBoard and the progress output."""
        for name in ("_file", "_writer", "_bar", "_plain"):
            handle = getattr(self, name)
            if handle is not None:
                handle.close()
                setattr(self, name, None)
