"""Multi-process training set-up: torchrun environment, process group, rank helpers, collectives.

``torchrun --nproc_per_node=N -m rqvae train-vae ...`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; :func:`init_distributed` reads them and joins the process group (gloo on
CPU, NCCL on CUDA). Without those variables everything runs as a single process (rank 0 of 1) and the
collectives below are no-ops, so trainers call them unconditionally.

Gradients are averaged either by DDP (:func:`wrap_ddp`) or explicitly with :func:`all_reduce_grads`
(one flattened all-reduce per call), which keeps GAN training with two models, several forwards of the
discriminator per step and gradient accumulation simple and bitwise deterministic. Parameters sharded by
FSDP (DTensors, :mod:`rqvae.train.fsdp`) get their averaged gradients from FSDP itself and are left out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (a tensor sharded by FSDP). torch.distributed.tensor takes about a second
    to import, so it is looked up only if something imported it already (no DTensor exists otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent).

    ``device``: "cpu", "cuda" or None (CUDA if available). On CUDA each process uses
    ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **kwargs) -> nn.Module:
    """DistributedDataParallel around ``model`` when running with several processes, else ``model``."""
    if get_world_size() == 1:
        return model
    device = device or next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Mean of scalar values over all ranks (one collective for the whole dict)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_flag(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place (one flattened all-reduce). Missing grads count as zero.
    Parameters sharded by FSDP are skipped: their gradients are averaged already."""
    if get_world_size() == 1:
        return
    params = [p for p in params if p.requires_grad and not is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` itself with one process)."""
    if get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_module(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy parameters and/or buffers of rank ``src`` to every rank (start of training, BN stats)."""
    if get_world_size() == 1:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def check_same_across_ranks(module: nn.Module, what: str = "model") -> None:
    """Raise if the parameters or buffers of ``module`` differ between ranks (a cheap checksum per
    tensor: sum and sum of squares in float64, gathered from every rank). Tensors sharded by FSDP hold
    a different piece on each rank by design and are not compared."""
    if get_world_size() == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not is_dtensor(t)]
    if not tensors:
        return
    local = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().pow(2).sum()])
                         for t in tensors]).flatten()
    gathered = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(gathered, local)
    for r, other in enumerate(gathered[1:], start=1):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"the {what} differs between rank 0 and rank {r}; the ranks went out of sync")


def sample_rows_global(candidates: torch.Tensor, n: int) -> torch.Tensor | None:
    """``n`` random rows of the concatenation of every rank's ``candidates`` (M_r, dim), same on all ranks.

    Without replacement when there are enough rows, otherwise with replacement; None if no rank has
    any. The indices are drawn with the default CPU generator (on rank 0 and broadcast under
    torch.distributed).
    """
    world = get_world_size()
    device = candidates.device
    if world == 1:
        sizes = [candidates.shape[0]]
    else:
        local = torch.tensor([candidates.shape[0]], device=device)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        sizes = [int(t) for t in gathered]
    total = sum(sizes)
    if total == 0:
        return None
    if world == 1 or get_rank() == 0:
        idx = torch.randperm(total)[:n] if total >= n else torch.randint(total, (n,))
        idx = idx.to(device)
    else:
        idx = torch.empty(n, dtype=torch.long, device=device)
    if world == 1:
        return candidates[idx].clone()
    dist.broadcast(idx, src=0)
    offset = sum(sizes[:get_rank()])
    mine = (idx >= offset) & (idx < offset + candidates.shape[0])
    out = torch.zeros(n, candidates.shape[1], device=device, dtype=candidates.dtype)
    out[mine] = candidates[idx[mine] - offset]
    dist.all_reduce(out)
    return out
