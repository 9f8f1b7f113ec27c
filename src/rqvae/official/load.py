"""Reading checkpoint folders in the official layout (kakaobrain/rq-vae-transformer), safely.

An official checkpoint folder holds ``model.pt`` (``{"epoch", "state_dict"[, "state_dict_ema"]}``, only
tensors, read with ``weights_only=True``: nothing is unpickled) and ``config.yaml`` whose ``arch`` section
describes the model (``arch.type`` is ``rq-vae`` or ``rq-transformer``). The converters
(:mod:`rqvae.official.vae`, :mod:`rqvae.official.transformer`) build on this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from rqvae.errors import UserError
from rqvae.models.hub import load_torch_file_safely

WEIGHT_CHOICES = ("auto", "ema", "raw")


def is_official_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like an official checkpoint folder (model.pt + config.yaml)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "model.pt").is_file()


def check_supported(what: str, value: Any, want: Any) -> None:
    """A one-line UserError when an official config option has a value our models do not implement."""
    if value != want:
        raise UserError(f"official config {what}={value!r} is not supported (only {want!r}); "
                        "this checkpoint cannot be converted")


def load_official(src_dir: str | os.PathLike, weights: str = "auto") -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, Any]]:
    """Read ``SRC_DIR/model.pt`` and ``SRC_DIR/config.yaml`` -> (state_dict, arch config dict).

    weights: "auto" takes ``state_dict_ema`` when present, else ``state_dict``; "ema" / "raw" force one.
    """
    src = Path(src_dir)
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass the official checkpoint folder holding model.pt "
                        "and config.yaml")
    model_file, config_file = src / "model.pt", src / "config.yaml"
    for f in (model_file, config_file):
        if not f.is_file():
            raise UserError(f"{f} is missing; an official checkpoint folder holds model.pt and config.yaml")
    try:
        config = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid YAML ({type(e).__name__}); is it an official config?") \
            from None
    if not isinstance(config, dict) or not isinstance(config.get("arch"), dict):
        raise UserError(f"{config_file} has no 'arch' section; is it an official rq-vae-transformer config?")
    ckpt = load_torch_file_safely(model_file)  # torch.load(weights_only=True): no arbitrary objects
    if not isinstance(ckpt, dict):
        raise UserError(f"{model_file} does not hold a dict with 'state_dict'; is it an official checkpoint?")
    if weights == "ema" and "state_dict_ema" not in ckpt:
        raise UserError(f"{model_file} has no 'state_dict_ema'; use --weights raw (or auto)")
    key = "state_dict_ema" if weights == "ema" or (weights == "auto" and "state_dict_ema" in ckpt) \
        else "state_dict"
    state = ckpt.get(key)
    if not isinstance(state, dict) or not state:
        raise UserError(f"{model_file} has no {key!r} of tensors; is it an official checkpoint?")
    # model EMA / DDP wrappers prefix the names with "module."
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{model_file} {key} holds non-tensor entries {bad[:3]}; "
                        "is it an official checkpoint?")
    return state, config["arch"]
