"""Sharded training checkpoints (FSDP, :mod:`rqvae.train.fsdp`): every rank writes its own pieces.

A checkpoint of a sharded run has the usual files of :mod:`rqvae.train.checkpoint` (written by rank 0;
their tensors are the unsharded ones: buffers, optimizer step counts, scheduler and RNG states) and::

    shard-00000-of-00002.safetensors   rank 0's piece of every sharded tensor (dim 0, rank order, as
    shard-00001-of-00002.safetensors   torch.chunk): module weights under their modules.safetensors names,
                                       optimizer moments under their optim.safetensors names

``state.json`` lists the sharded tensors with their full shapes (``"sharded"``). With as many processes
as wrote it, each rank reads only its own file; with another number, or into an unsharded model, the pieces
are joined and cut again. ``python -m rqvae.train.export CHECKPOINT OUT_DIR`` joins them into one
``model.safetensors`` (:mod:`rqvae.train.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rqvae.distributed import is_dtensor
from rqvae.errors import UserError

SHARD_FILE = "shard-{rank:05d}-of-{world:05d}.safetensors"


def split_sharded(tensors: dict[str, torch.Tensor], *, clone: bool) -> tuple[dict, dict, dict]:
    """(the plain tensors on the CPU (copies if ``clone``), this rank's pieces of the sharded tensors,
    their full shapes) of ``tensors``."""
    plain, pieces, shapes = {}, {}, {}
    for k, v in tensors.items():
        if is_dtensor(v):
            pieces[k] = v.to_local().detach().cpu().contiguous().clone()
            shapes[k] = list(v.shape)
        else:
            v = v.detach().cpu().contiguous()
            plain[k] = v.clone() if clone else v
    return plain, pieces, shapes


def write_pieces(folder: Path, pieces: dict[str, torch.Tensor], rank: int, world: int) -> Path:
    path = folder / SHARD_FILE.format(rank=rank, world=world)
    save_file(pieces, str(path), metadata={"format": "rqvae-training-checkpoint-shard"})
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a missing or damaged one is a one-line UserError."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} is missing or corrupt ({e}); resume from an older checkpoint") from None


def joined(path: Path, sharded: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every sharded tensor of the checkpoint ``path`` as a whole (the pieces of all ranks joined)."""
    world = int(sharded["world_size"])
    files = [read_tensors(path / SHARD_FILE.format(rank=r, world=world)) for r in range(world)]
    shapes = {**sharded["modules"], **sharded["optim"]}
    out = {}
    for k, shape in shapes.items():
        out[k] = torch.cat([f[k] for f in files if k in f], dim=0)
        if list(out[k].shape) != list(shape):
            raise UserError(f"the pieces of {k} in {path} join to {tuple(out[k].shape)}, not {tuple(shape)}; "
                            "the checkpoint is damaged, resume from an older one")
    return out


def read_pieces(path: Path, sharded: dict[str, Any], rank: int, world: int, own_only: bool) -> dict:
    """The sharded tensors of a checkpoint for this rank: its own pieces when ``own_only`` and the
    checkpoint was written by ``world`` processes, otherwise whole tensors (:func:`fit_to` cuts them)."""
    if own_only and int(sharded["world_size"]) == world:
        return read_tensors(path / SHARD_FILE.format(rank=rank, world=world))
    return joined(path, sharded)


def fit_to(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A saved tensor (this rank's piece or the whole tensor) in the form of ``like``: sharded as it if it
    is a DTensor (cutting this rank's chunk out of a whole tensor, as FSDP does), else unchanged."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import DTensor  # loaded already (``like`` is one); slow to import

    if tuple(value.shape) == tuple(like.shape):  # whole: this rank's chunk, as FSDP cuts it
        rank = like.device_mesh.get_local_rank()
        chunks = torch.chunk(value, like.device_mesh.size(), dim=0)
        value = chunks[rank] if rank < len(chunks) else value[:0]
    return DTensor.from_local(value.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride(), run_check=False)


def fit_optimizer_state(opt: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    """Put the loaded per-parameter tensors of ``osd`` (in place) in the form of their parameters."""
    ids = [pid for g in osd.get("param_groups", []) for pid in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        for k, v in osd.get("state", {}).get(pid, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.dim() == p.dim():
                osd["state"][pid][k] = fit_to(v, p)
