"""Activation checkpointing (``--activation-checkpointing``): trade compute for memory.

Each given block (a transformer block of the RQ-Transformer, a resnet block of the RQ-VAE) keeps only its
input during the forward pass; its activations are recomputed in the backward pass
(``torch.utils.checkpoint``, non-reentrant, with the RNG state of the forward, so dropout draws the same
mask). The losses and gradients are those of the plain model; the peak activation memory of a deep model
drops to about one block's worth plus the block inputs, for about one more forward pass per step.

The block's ``forward`` is wrapped on the instance: the module tree, the parameter names and the state dict
stay as they are (checkpoints and ``save_pretrained`` folders do not change), and FSDP's hooks, which run
around ``module(...)``, stay outside the recomputed region. Without gradients (evaluation, sampling) the
wrapper calls the block directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

HELP = ("recompute each transformer block's (train-ar) / resnet block's (train-vae) activations in the "
        "backward pass instead of keeping them: less memory, about one more forward pass of compute")


class _Recomputed:
    """A block's forward that runs under ``torch.utils.checkpoint`` when gradients are on."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Recompute the activations of each of ``blocks`` in the backward pass; returns how many blocks."""
    n = 0
    for block in blocks:
        if not isinstance(block.forward, _Recomputed):
            block.forward = _Recomputed(block.forward)
        n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    return isinstance(block.forward, _Recomputed)
