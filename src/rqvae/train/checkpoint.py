"""Training-state checkpoints: safetensors + JSON, written atomically, never pickled.

Layout of ``run_dir/checkpoints/``::

    step_000123/
        modules.safetensors   every module's state dict, keys prefixed "<module name>."
        optim.safetensors     every other tensor: optimizer state (exp_avg, exp_avg_sq, step, ...),
                              scheduler tensors, RNG states (torch CPU / CUDA, numpy's key)
        state.json            step, extra, optimizer / scheduler non-tensor state (param_groups, counters),
                              numpy and python ``random`` RNG state; tensors appear as {"__tensor__": name}
    latest                    the name of the newest complete checkpoint, replaced atomically (for people
                              and tools; :func:`latest_checkpoint` takes the highest complete step_* folder)

A save writes into a hidden temporary folder, fsyncs it, renames it into place and only then updates
``latest`` and deletes checkpoints beyond the last ``keep_last``: a kill at any moment leaves the previous
checkpoint readable. Optimizer and RNG state round-trip bit for bit, so a resumed run continues exactly as
the uninterrupted run would have.

A sharded run (``--fsdp``, :mod:`rqvae.train.fsdp`) calls :func:`save_checkpoint` on every rank: each
writes its pieces of the sharded tensors to ``shard-RRRRR-of-WWWWW.safetensors`` in the same folder before
rank 0 completes it as above (:mod:`rqvae.train.sharded`); :func:`load_checkpoint` puts them back.

Official ``.pt`` files are read only through :func:`rqvae.models.hub.load_torch_file_safely`
(``weights_only=True``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from rqvae import distributed as dist
from rqvae.errors import UserError
from rqvae.models.hub import atomic_write_bytes, load_state_dict_checked
from rqvae.train.sharded import (
    fit_optimizer_state,
    fit_to,
    read_pieces,
    read_tensors,
    split_sharded,
    write_pieces,
)

FORMAT = "rqvae-training-checkpoint"
VERSION = 1
MODULES_FILE, OPTIM_FILE = "modules.safetensors", "optim.safetensors"
STATE_FILE, LATEST_FILE = "state.json", "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MARKERS = ("__tensor__", "__tuple__", "__items__", "__float__")
# optimizer state entries that must have their parameter's shape
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                 "sum")


# ----------------------------------------------------------------------------------------------------------
# JSON encoding of state dicts: tensors go to safetensors, the rest to JSON

def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able form of ``obj``; tensors are moved into ``tensors`` under ``name`` and referenced."""
    if dist.is_dtensor(obj):  # sharded (FSDP): this rank's piece goes to its shard file
        tensors[name] = obj.detach()
        return {"__tensor__": name}
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return _encode(obj.item(), name, tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{name}.key{i}", tensors), _encode(v, f"{name}.{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise UserError(f"cannot store a {type(obj).__name__} at {name} in a checkpoint: only tensors, numbers, "
                    "strings, lists, tuples and dicts are saved (no pickle); convert it first")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "__tensor__":
            if value not in tensors:
                raise UserError(f"checkpoint tensor {value} is missing from {OPTIM_FILE}; the checkpoint is "
                                "damaged, resume from an older one")
            return tensors[value]
        if key == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if key == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if key == "__float__":
            return float(value)
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------------------
# RNG states

def _rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.cpu()
        n_cuda = torch.cuda.device_count()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return {"cuda_devices": n_cuda,
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def _set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if state["cuda_devices"] and torch.cuda.is_available():
        saved = [tensors[f"rng.cuda.{i}"] for i in range(state["cuda_devices"])]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
    npy = state["numpy"]
    np.random.set_state((npy["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# ----------------------------------------------------------------------------------------------------------
# file helpers

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    return run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MODULES_FILE, OPTIM_FILE, STATE_FILE))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(ck: Path) -> None:
    """Delete temporary / half-deleted folders left by killed saves (of processes no longer running)."""
    for p in ck.iterdir():
        m = re.match(r"^\.(tmp|trash)-.*-(\d+)$", p.name)
        if m and p.is_dir() and (int(m.group(2)) == os.getpid() or not _pid_alive(int(m.group(2)))):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    ck = _checkpoints_dir(run_dir)
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir() if (m := _STEP_DIR.match(p.name)) and _is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (``run_dir`` or ``run_dir/checkpoints``), or None.

    That is the highest-step ``step_*`` folder, which is what ``latest`` names unless a save was killed
    between renaming its folder into place and updating ``latest`` (its folder is complete then, and used).
    Temporary folders of interrupted saves are never returned."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------
# save / load

def _collect(step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             schedulers: dict[str, Any], extra: dict[str, Any]) -> tuple[dict, dict, dict, str]:
    """(module tensors, other tensors, this rank's pieces of sharded tensors, state.json text)."""
    module_tensors = {f"{mname}.{k}": v.detach() for mname, module in modules.items()
                      for k, v in module.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "modules": sorted(modules),
        "optimizers": {k: _encode(o.state_dict(), f"optimizers.{k}", tensors) for k, o in optimizers.items()},
        "schedulers": {k: _encode(s.state_dict(), f"schedulers.{k}", tensors) for k, s in schedulers.items()},
        "extra": _encode(extra, "extra", tensors),
        "rng": _rng_state(tensors),
    }
    module_tensors, module_pieces, module_shapes = split_sharded(module_tensors, clone=True)
    tensors, optim_pieces, optim_shapes = split_sharded(tensors, clone=False)  # _encode cloned them
    if module_shapes or optim_shapes:
        state["sharded"] = {"world_size": dist.get_world_size(), "modules": module_shapes,
                            "optim": optim_shapes}
    try:
        text = json.dumps(state, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:  # _encode makes everything JSON-able; this is a safety net
        raise UserError(f"checkpoint state is not JSON-serializable ({e})") from None
    return module_tensors, tensors, {**module_pieces, **optim_pieces}, text


def _publish(ck: Path, tmp: Path, name: str, keep_last: int | None) -> None:
    """Rename the finished ``tmp`` folder to ``name``, point ``latest`` at it, drop the old checkpoints."""
    final = ck / name
    if final.exists():  # saving the same step again (e.g. after a resume): move the old one aside first
        trash = ck / f".trash-{name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ck)
    atomic_write_bytes(ck / LATEST_FILE, (name + "\n").encode())
    _fsync_dir(ck)
    if keep_last:
        for old in list_checkpoints(ck)[:-keep_last]:
            if old.name == name:
                continue
            trash = ck / f".trash-{old.name}-{os.getpid()}"
            os.rename(old, trash)  # out of sight first: never a half-deleted step_ folder
            shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    schedulers: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    keep_last: int | None = 3) -> Path:
    """Save the training state at ``step`` to ``run_dir/checkpoints/step_{step:06d}`` atomically and return
    that folder. ``extra`` must be JSON-able (numbers, strings, lists, dicts). Keeps the newest
    ``keep_last`` checkpoints (all of them if None or 0). Call it on one process (rank 0) only, except
    for sharded (FSDP) modules or optimizers: then on every rank (each writes its pieces)."""
    optimizers, schedulers, extra = optimizers or {}, schedulers or {}, extra or {}
    module_tensors, tensors, pieces, text = _collect(step, modules, optimizers, schedulers, extra)
    sharded = bool(pieces)  # the same on every rank: the modules are sharded alike
    main = not sharded or dist.is_main()
    ck = _checkpoints_dir(run_dir)
    name = f"step_{int(step):06d}"
    if main:
        ck.mkdir(parents=True, exist_ok=True)
        _remove_stale(ck)
    tmp = ck / f".tmp-{name}-{dist.broadcast_int(os.getpid()) if sharded else os.getpid()}"
    if main:
        tmp.mkdir()
    if sharded:  # every rank's pieces, into the folder rank 0 made, before rank 0 completes it
        dist.barrier()
        _fsync_file(write_pieces(tmp, pieces, dist.get_rank(), dist.get_world_size()))
        dist.barrier()
        if not main:
            return ck / name

    meta = {"format": FORMAT, "step": str(int(step))}
    save_file(module_tensors, str(tmp / MODULES_FILE), metadata=meta)
    save_file(tensors, str(tmp / OPTIM_FILE), metadata=meta)
    (tmp / STATE_FILE).write_text(text)
    for f in (MODULES_FILE, OPTIM_FILE, STATE_FILE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    _publish(ck, tmp, name, keep_last)
    return ck / name


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint folder or a run folder")
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint; pass a checkpoints/step_* folder or a run "
                        "folder with checkpoints")
    return found


def load_checkpoint(path: str | os.PathLike, modules: dict[str, torch.nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    schedulers: dict[str, Any] | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint folder (or the latest one of a run folder) into the given modules, optimizers and
    schedulers, restore the RNG states, and return ``extra`` (with ``"step"`` set to the checkpoint's step
    unless ``extra`` has its own). Every requested name must be in the checkpoint and match it exactly;
    otherwise a one-line :class:`UserError` says what differs. Nothing is unpickled."""
    path = resolve_checkpoint(path)
    modules, optimizers, schedulers = modules or {}, optimizers or {}, schedulers or {}
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / STATE_FILE} is unreadable ({e}); resume from an older checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an rqvae training checkpoint (no {FORMAT!r} in {STATE_FILE})")
    module_tensors, tensors = read_tensors(path / MODULES_FILE), read_tensors(path / OPTIM_FILE)
    if state.get("sharded"):  # this rank's pieces (or, resharding, whole tensors: fit_to cuts them)
        sharded = state["sharded"]
        own = all(any(dist.is_dtensor(v) for v in m.state_dict().values()) for m in modules.values())
        pieces = read_pieces(path, sharded, dist.get_rank(), dist.get_world_size(), own_only=own)
        module_tensors.update({k: pieces[k] for k in sharded["modules"]})
        tensors.update({k: pieces[k] for k in sharded["optim"]})

    for mname, module in modules.items():
        if mname not in state["modules"]:
            raise UserError(f"checkpoint {path} has no module {mname!r} (it has {state['modules']}); "
                            "is it from another kind of run?")
        prefix, own = f"{mname}.", module.state_dict()
        sd = {k[len(prefix):]: v for k, v in module_tensors.items() if k.startswith(prefix)}
        sd = {k: fit_to(v, own[k]) if k in own else v for k, v in sd.items()}  # sharded as the module
        load_state_dict_checked(module, sd, source=f"checkpoint {path} module {mname!r}")

    for oname, opt in optimizers.items():
        if oname not in state["optimizers"]:
            raise UserError(f"checkpoint {path} has no optimizer {oname!r} "
                            f"(it has {sorted(state['optimizers'])})")
        osd = _decode(state["optimizers"][oname], tensors)
        fit_optimizer_state(opt, osd)
        _check_optimizer(opt, osd, f"checkpoint {path} optimizer {oname!r}")
        try:
            opt.load_state_dict(osd)
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} optimizer {oname!r} does not fit: {e}") from None

    for sname, sched in schedulers.items():
        if sname not in state["schedulers"]:
            raise UserError(f"checkpoint {path} has no scheduler {sname!r} "
                            f"(it has {sorted(state['schedulers'])})")
        sched.load_state_dict(_decode(state["schedulers"][sname], tensors))

    if restore_rng:
        _set_rng_state(state["rng"], tensors)
    extra = _decode(state.get("extra", {}), tensors)
    extra.setdefault("step", state["step"])
    return extra


def _check_optimizer(opt: torch.optim.Optimizer, osd: dict[str, Any], source: str) -> None:
    groups = osd.get("param_groups", [])
    if len(groups) != len(opt.param_groups):
        raise UserError(f"{source} has {len(groups)} parameter groups, the optimizer has "
                        f"{len(opt.param_groups)}; build the optimizer as the run did")
    params = []
    for i, (g, saved) in enumerate(zip(opt.param_groups, groups)):
        if len(g["params"]) != len(saved["params"]):
            raise UserError(f"{source} group {i} has {len(saved['params'])} parameters, the optimizer has "
                            f"{len(g['params'])}; is the model built with the same config?")
        params += list(zip(saved["params"], g["params"]))
    for pid, p in params:
        for k, v in osd.get("state", {}).get(pid, {}).items():
            if k in _PARAM_SHAPED and isinstance(v, torch.Tensor) and v.shape != p.shape:
                raise UserError(f"{source} state {k} of parameter {pid} has shape {tuple(v.shape)}, the "
                                f"parameter has {tuple(p.shape)}; is the model built with the same config?")
