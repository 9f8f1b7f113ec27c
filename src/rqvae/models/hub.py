"""Checkpoint folders in the diffusers / huggingface_hub convention: ``config.json`` + ``model.safetensors``.

A model class mixes in :class:`PretrainedMixin`, sets ``config_class`` (a dataclass) and ``model_type``
(a string stored in ``config.json``), and takes its config as the only constructor argument.
Nothing is unpickled: weights are safetensors, the config is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

from rqvae.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T", bound="PretrainedMixin")


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, deep copy


def config_from_dict(config_class: type, data: dict[str, Any], source: str = "config") -> Any:
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{source} has unknown fields {unknown} for {config_class.__name__}; "
            "was it written by a newer rqvae or for another model type?"
        )
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    try:
        return config_class(**kwargs)
    except TypeError as e:
        raise UserError(f"{source} is incomplete for {config_class.__name__}: {e}") from None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, or a training run whose ``model/`` is one (-> ``RUN/model``); otherwise a one-line
    UserError that says what the folder is and what to pass instead."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "model" / CONFIG_NAME).is_file():
        return path / "model"
    if not path.exists():
        raise UserError(f"{path} is not a model folder: it does not exist; pass a folder with {CONFIG_NAME} "
                        f"and {WEIGHTS_NAME} or a training run holding model/")
    if (path / "checkpoints").is_dir():
        raise UserError(f"{path} is not a model folder: a training run that has not finished "
                        f"({path / 'model'} is written when training ends; checkpoints/ hold the state: "
                        "resume to finish)")
    if (path.parent / "model" / CONFIG_NAME).is_file():
        raise UserError(f"{path} is not a model folder; did you mean {path.parent / 'model'}?")
    raise UserError(f"{path} is not a model folder: {path / CONFIG_NAME} is missing (and {path / 'model'} "
                    f"holds none); expected {CONFIG_NAME} and {WEIGHTS_NAME} (save_pretrained or a training "
                    "run)")


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of a model folder's weights file (a run folder means its ``model/``): the model's identity
    in codes files."""
    h = hashlib.sha256()
    with open(resolve_model_dir(model_dir) / WEIGHTS_NAME, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_dict_for_saving(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


class PretrainedMixin:
    config_class: ClassVar[type]
    model_type: ClassVar[str]

    config: Any

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": self.model_type, **config_to_dict(self.config)}
        atomic_save_safetensors(state_dict_for_saving(self), path / WEIGHTS_NAME,
                                metadata={"model_type": self.model_type})
        atomic_write_bytes(path / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
        return path

    @classmethod
    def load_config(cls, path: str | os.PathLike) -> Any:
        """The config in ``path`` (a model folder, or a training run: its ``model/``)."""
        path = resolve_model_dir(path)
        cfg_file = path / CONFIG_NAME
        try:
            data = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_file} is not valid JSON ({e}); re-save the model") from None
        model_type = data.pop("model_type", None)
        if model_type != cls.model_type:
            raise UserError(f"{path} holds a {model_type!r} model, not a {cls.model_type!r}; "
                            "pass the folder of the right model")
        return config_from_dict(cls.config_class, data, source=str(cfg_file))

    @classmethod
    def from_pretrained(cls: type[T], path: str | os.PathLike, map_location: str | torch.device = "cpu") -> T:
        path = resolve_model_dir(path)  # a training run means its model/
        config = cls.load_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{weights} is missing; the model folder {path} is incomplete")
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{weights} could not be read ({e}); the file is corrupt or truncated") from None
        model = cls(config)  # type: ignore[call-arg]
        load_state_dict_checked(model, state, source=str(weights))
        return model.to(map_location)


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line UserError for missing, unexpected or mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, config expects {tuple(own[k].shape)}")
        raise UserError(f"{source} does not match its config: {'; '.join(parts)}")
    model.load_state_dict(state)


def load_torch_file_safely(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.pt`` file (e.g. an official checkpoint) with ``torch.load(weights_only=True)``: tensors and
    plain containers only. A file that asks to build any other object (which an ordinary unpickler would
    do, running its code) is refused with a UserError and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the path of a .pt checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines() or [""]
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0])
        raise UserError(f"{path} holds objects other than tensors ({detail[:160]}); rqvae refuses to "
                        "unpickle arbitrary objects: only use checkpoint files from sources you trust"
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable torch checkpoint ({str(e).splitlines()[0][:160]}); "
                        "is the file complete?") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; is it a checkpoint?")
    return obj
