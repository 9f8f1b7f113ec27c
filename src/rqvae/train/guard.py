"""The non-finite-loss guard: skip steps whose loss or gradients are NaN/Inf, stop after too many."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from rqvae import distributed as dist
from rqvae.errors import UserError

log = logging.getLogger("rqvae.train.guard")


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
        self._saved: dict[tuple[int, str], torch.Tensor] = {}

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
        """True if all values are finite on every rank (one host sync for all tensors). Counts bad steps;
        raises :class:`NonFiniteLossError` after too many in a row."""
        floats = [float(v) for v in values if not isinstance(v, torch.Tensor)]
        tensors = [v.detach().float().reshape(-1) for v in values if isinstance(v, torch.Tensor)]
        bad = not all(math.isfinite(v) for v in floats)
        if tensors:
            flat = torch.cat([t.to(tensors[0].device) for t in tensors])
            bad = bad or not bool(torch.isfinite(flat).all())
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
