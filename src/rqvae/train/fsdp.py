"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for stage 2 (``train-ar --fsdp`` under torchrun).

Every rank holds 1/N of each parameter, its gradient and its AdamW moments (dim 0 of each tensor split in
rank order, as ``torch.chunk``); a block's full weights exist only while it runs (all-gathered before its
forward and again before its backward, freed after). Each transformer block is one FSDP unit and the root
(embeddings, heads) another, so the peak is one block's weights on top of the shards. Buffers (the frozen
codebook) stay whole on every rank.

How the rest of the loop meets it:

* gradients arrive averaged over the ranks (FSDP reduce-scatters them in the backward pass), so the
  trainer's own gradient all-reduce skips them (:func:`rqvae.distributed.all_reduce_grads`); the clipping
  norm is computed over all shards (:func:`rqvae.train.optim.clip_grad_norm`);
* FSDP modules cannot be deep-copied: the EMA and best-model copies are new sharded instances loaded from
  the model's state dict (:func:`sharded_twin`);
* checkpoints are sharded: every rank writes its pieces (:mod:`rqvae.train.checkpoint`), and
  ``python -m rqvae.train.sharded CHECKPOINT OUT`` joins them into one ``model.safetensors``;
* sample grids and the final ``RUN/model`` use a plain copy of the model gathered on rank 0
  (:func:`gathered_copy`; every rank takes part in the gather).

It runs with gloo on CPU as with NCCL on CUDA (checked with torch 2.13); with one process there is nothing
to shard and the model stays a plain module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from rqvae import distributed as dist

HELP = ("shard the RQ-Transformer's weights, gradients and optimizer state over the processes (FSDP2, "
        "torchrun with several processes; checkpoints are sharded too, RUN/model is gathered as usual)")


def shard_model(model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    """Shard each of ``blocks`` as its own FSDP unit, then the rest of ``model`` (in place; returns it).
    Call it on every rank, on identical weights, before the optimizer is built."""
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # The root returns its logits as a reshaped view; FSDP warns in case the caller modifies it in place,
    # which the losses never do (they read it through log_softmax).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def sharded_twin(model: nn.Module, build: Callable[[], nn.Module],
                 blocks: Callable[[nn.Module], Iterable[nn.Module]]) -> nn.Module:
    """A frozen copy of the sharded ``model`` (for the EMA or the best model): ``build()`` makes a new
    instance (without touching the training RNG), sharded as the model, then loaded with its state."""
    with torch.random.fork_rng(devices=[]):
        twin = build()
    shard_model(twin, blocks(twin))
    twin.load_state_dict(model.state_dict())
    return twin.eval().requires_grad_(False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of ``model`` as CPU tensors on rank 0 ({} on the other ranks). A sharded model
    is all-gathered (a collective: every rank must call it); a plain model is only copied."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.is_main() else {}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def gathered_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A plain (unsharded) copy of ``model`` in eval mode on rank 0, built by ``build()`` and loaded with
    the gathered weights; None on the other ranks. Every rank must call it."""
    state = full_state_dict(model)
    if not dist.is_main():
        return None
    with torch.random.fork_rng(devices=[]):
        plain = build()
    plain.load_state_dict(state)
    return plain.eval().requires_grad_(False)
