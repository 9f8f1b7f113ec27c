"""Find and load the models ``rqvae serve`` shows: an RQ-VAE and, optionally, an RQ-Transformer.

Each path given on the command line may be a model folder (``config.json`` whose ``model_type`` is
``rqvae`` or ``rqtransformer``), a training run folder ``RUN`` holding ``RUN/model``, or a folder of such
runs (``make demo``'s ``runs/demo`` holds ``vae/model`` and ``ar/model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rqvae.data.fmnist import FMNIST_CLASSES
from rqvae.data.text import load_tokenizer
from rqvae.errors import UserError
from rqvae.eval.pairing import check_pair
from rqvae.models.hub import CONFIG_NAME, resolve_model_dir
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE

MODEL_TYPES = ("rqvae", "rqtransformer")


@dataclass
class Models:
    """The loaded models and what the page needs to know about them."""

    vae: Any  # RQVAE, eval mode
    vae_dir: Path
    device: torch.device
    ar: Any = None  # RQTransformer or None
    ar_dir: Path | None = None
    class_names: list[str] = field(default_factory=list)  # class models: one name per class id
    tokenizer: Any = None  # text models: tokenizers.Tokenizer


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _model_folders(path: Path) -> list[Path]:
    """The model folders a command-line path stands for (itself, RUN/model, or its runs' models)."""
    if (path / CONFIG_NAME).is_file():
        return [path]
    if (path / "model" / CONFIG_NAME).is_file():
        return [path / "model"]
    children = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    return [c if (c / CONFIG_NAME).is_file() else c / "model" for c in children
            if (c / CONFIG_NAME).is_file() or (c / "model" / CONFIG_NAME).is_file()]


def find_model_dirs(paths: list[str | Path]) -> tuple[Path, Path | None]:
    """Command-line paths -> (RQ-VAE folder, RQ-Transformer folder or None)."""
    found: dict[str, list[Path]] = {t: [] for t in MODEL_TYPES}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist; pass a model folder, a run folder "
                            "or a `make demo` folder")
        folders = _model_folders(path)
        if path not in folders and path / "model" not in folders:  # runs in a folder: other models are
            folders = [f for f in folders if _model_type(f) in found]  # skipped (the demo's classifier)
        if not folders:
            raise UserError(f"{path} holds no model: expected config.json (model_type rqvae or "
                            "rqtransformer), RUN/model, or a `make demo` folder such as runs/demo "
                            "(convert official checkpoints first: rqvae convert-official)")
        for folder in folders:
            kind = _model_type(folder)
            if kind not in found:
                raise UserError(f"{folder}/config.json has model_type {kind!r}; rqvae serve shows "
                                "'rqvae' and 'rqtransformer' models")
            found[kind].append(folder)
    for kind, folders in found.items():
        if len(folders) > 1:
            raise UserError(f"several {kind} models given ({', '.join(map(str, folders))}); pass one of each")
    ar_dir = found["rqtransformer"][0] if found["rqtransformer"] else None
    if not found["rqvae"]:
        vae = _trained_on(ar_dir) if ar_dir is not None else None
        if vae is None:
            raise UserError("no RQ-VAE given; pass its folder too, "
                            "e.g. rqvae serve runs/demo/vae runs/demo/ar")
        found["rqvae"].append(vae)
    return found["rqvae"][0], ar_dir


def train_config(model_dir: Path) -> dict:
    """The training run's ``train_config.json`` beside a ``RUN/model`` folder, or {}."""
    for folder in (model_dir, model_dir.parent):
        try:
            data = json.loads((folder / "train_config.json").read_text())
        except (OSError, ValueError):
            continue
        return data if isinstance(data, dict) else {}
    return {}


def _trained_on(ar_dir: Path) -> Path | None:
    """The RQ-VAE folder (or run: its model/) an RQ-Transformer's run was trained on, when its
    train_config.json names one."""
    vae = train_config(ar_dir).get("vae")
    if not isinstance(vae, str):
        return None
    try:
        return resolve_model_dir(vae)
    except UserError:
        return None


def class_names(ar: Any, ar_dir: Path) -> list[str]:
    """Names for class ids: the model config's class_names, Fashion-MNIST's when the run trained on
    "fmnist" (models saved before configs held names), else the ids themselves."""
    num_classes = ar.config.num_classes
    names = getattr(ar.config, "class_names", ())
    if len(names) == num_classes:
        return [str(n) for n in names]
    data = train_config(ar_dir).get("data")
    if isinstance(data, str) and (data == "fmnist" or data.startswith("fmnist:")):
        if len(FMNIST_CLASSES) == num_classes:
            return list(FMNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def load_models(paths: list[str | Path], device: str | None = None) -> Models:
    """Find, load and check the models (the RQ-VAE must be the one the RQ-Transformer was trained on)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
    vae_dir, ar_dir = find_model_dirs(paths)
    models = Models(vae=RQVAE.from_pretrained(vae_dir, map_location=dev).eval(), vae_dir=vae_dir, device=dev)
    if ar_dir is None:
        return models
    models.ar, models.ar_dir = RQTransformer.from_pretrained(ar_dir, map_location=dev).eval(), ar_dir
    check_pair(models.vae, models.ar)
    cfg = models.ar.config
    if cfg.cond_type == "class":
        models.class_names = class_names(models.ar, ar_dir)
    elif cfg.cond_type == "text":
        models.tokenizer = load_tokenizer(ar_dir, max_len=cfg.cond_len)
    return models
