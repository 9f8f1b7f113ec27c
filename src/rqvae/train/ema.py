"""Model EMA: an exponential moving average of a model's parameters."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from rqvae import distributed as dist
from rqvae.errors import UserError


class ModelEMA(nn.Module):
    """Exponential moving average of a model's parameters: theta_ema <- d theta_ema + (1 - d) theta.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs get a
    useful average. Buffers (e.g. the EMA codebook, which is already an average) are copied as they are.
    It is an ``nn.Module``: checkpoint it like any other (``module.*`` and ``num_updates``).
    """

    num_updates: torch.Tensor

    def __init__(self, model: nn.Module, decay: float = 0.999, module: nn.Module | None = None) -> None:
        """``module``: the frozen copy of ``model`` to keep the average in (default: a deep copy; a sharded
        model passes a sharded twin, see :meth:`rqvae.train.task.TrainTask.copy_model`)."""
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        if module is None:
            module = copy.deepcopy(dist.unwrap(model)).eval().requires_grad_(False)
        self.module = module
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

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` for good (the end of a run)."""
        for p, e in zip(dist.unwrap(model).parameters(), self.module.parameters()):
            p.copy_(e)

    @contextlib.contextmanager
    def swap_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (for evaluation or saving)."""
        model = dist.unwrap(model)
        saved = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
