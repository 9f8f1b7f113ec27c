"""Optimizers, the LR schedule and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from rqvae.distributed import is_dtensor
from rqvae.errors import UserError


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


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient 2-norm (before clipping) as a 0-dim tensor, inf/nan if non-finite; clips to
    ``max_norm`` if > 0. No host sync: the caller reads it once, when it checks or logs it. Gradients
    sharded by FSDP (DTensors) count whole: the norm is reduced over their shards on every rank."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if any(is_dtensor(p.grad) for p in params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else \
            torch.nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if is_dtensor(norm) else norm
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
