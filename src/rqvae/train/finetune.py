"""Fine-tuning: start a training run from a trained or published model (``--init-from DIR``).

Unlike ``--resume`` (which continues an interrupted run: its optimizer moments, schedule and data
position), ``--init-from`` starts a new run from a model's weights with a fresh optimizer. ``DIR`` is one
of our model folders (``config.json`` + ``model.safetensors``), a training run (its ``model/``), or an
official checkpoint folder (``model.pt`` + ``config.yaml``, converted on the fly). The architecture is the
model's: an explicitly given ``--preset`` / ``--model-config`` must agree with it (fields that only change
training, like dropout, may be set).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rqvae.errors import UserError
from rqvae.models.hub import CONFIG_NAME
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.official.load import is_official_folder, load_official
from rqvae.official.transformer import convert_official_rqtransformer
from rqvae.official.vae import load_rqvae

INIT_HELP = ("start a new run from this model's weights with a fresh optimizer (unlike --resume, which "
             "continues an interrupted run in --out): our model folder, a training run (its model/) or an "
             "official checkpoint folder (model.pt + config.yaml); the architecture is the model's")
FREEZE_PARTS = ("encoder", "codebook")
# RQ-VAE config fields that change training only (may differ from the --init-from model's)
VAE_TRAINING_FIELDS = frozenset({"ema_decay", "decays", "restart_dead_codes", "commitment_weight", "dropout"})
# RQ-Transformer fields set from the data and the RQ-VAE, and fields that change training only
AR_DATA_FIELDS = frozenset({"code_shape", "vocab_size", "embed_dim", "cond_type", "num_classes",
                            "text_vocab_size", "cond_len", "class_names"})
AR_TRAINING_FIELDS = frozenset({"dropout", "attn_dropout", "cfg_dropout"})


def init_folder(path: str | os.PathLike) -> Path:
    """``--init-from``'s folder: a model folder, an official checkpoint folder, or a run's ``model/``."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file() or is_official_folder(p):
        return p
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    if (p / "checkpoints").is_dir():
        raise UserError(f"--init-from {p}: that run has no finished model (no {p / 'model'}); finish it "
                        f"with --resume --out {p}, or pass a model folder")
    raise UserError(f"--init-from {p} is not a model folder (config.json + model.safetensors), a training "
                    "run or an official checkpoint folder (model.pt + config.yaml)")


def with_architecture_of(loaded: Any, requested: dict[str, Any], *, source: str,
                         training_fields: frozenset[str], ignored: frozenset[str] = frozenset()) -> Any:
    """``loaded`` (the --init-from model's config) with the training-only fields of ``requested``; any other
    requested field must equal the loaded one (a one-line UserError names the first that does not)."""
    fields = {k: v for k, v in requested.items() if k not in ignored}
    wanted = dataclasses.asdict(dataclasses.replace(loaded, **fields))
    have = dataclasses.asdict(loaded)
    for key in fields:
        if key not in training_fields and wanted[key] != have[key]:
            raise UserError(f"--init-from {source} has {key}={have[key]!r} but --preset/--model-config/the "
                            f"options ask for {wanted[key]!r}; drop them (the architecture comes from "
                            "--init-from) or train from scratch")
    return dataclasses.replace(loaded, **{k: v for k, v in fields.items() if k in training_fields})


# ----------------------------------------------------------------------------------------- stage 1
def load_init_vae(path: str | os.PathLike) -> RQVAE:
    folder = init_folder(path)
    return load_rqvae(folder) if is_official_folder(folder) else RQVAE.from_pretrained(folder)


def parse_freeze(spec: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in parts if p not in FREEZE_PARTS]
    if bad:
        raise UserError(f"--freeze {spec}: unknown part(s) {bad}; choose from {', '.join(FREEZE_PARTS)} "
                        "(comma-separated)")
    return parts


def freeze_vae(vae: RQVAE, parts: tuple[str, ...]) -> None:
    """Frozen encoder: the encoder and quant_conv parameters get requires_grad False (so the optimizer
    leaves them out). A frozen codebook is kept by running the quantizer in eval mode (no EMA updates, no
    dead-code restarts): see :func:`codebook_mode`."""
    if "encoder" in parts:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)


def codebook_mode(vae: RQVAE, parts: tuple[str, ...]) -> None:
    """Before a training forward: the quantizer updates its codebook only when the codebook is not frozen."""
    if "codebook" in parts:
        vae.quantizer.eval()


# ----------------------------------------------------------------------------------------- stage 2
def load_init_transformer(path: str | os.PathLike, codebook: torch.Tensor) -> RQTransformer:
    """Our RQ-Transformer folder, or an official one converted with ``codebook`` (the paired RQ-VAE's,
    which the official checkpoint does not hold)."""
    folder = init_folder(path)
    if is_official_folder(folder):
        state, arch = load_official(folder)
        if arch.get("type") != "rq-transformer":
            raise UserError(f"--init-from {folder} is an official {arch.get('type')!r} checkpoint; train-ar "
                            "needs an RQ-Transformer (arch.type rq-transformer)")
        return convert_official_rqtransformer(state, arch, codebook)
    return RQTransformer.from_pretrained(folder)


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor], *, keep: tuple[str, ...] = ()
                     ) -> list[str]:
    """Copy every tensor of ``source`` whose name and shape match into ``model`` (except ``keep``, which
    stay as they are); returns the names left as freshly initialised."""
    own = model.state_dict()
    fresh = []
    with torch.no_grad():
        for name, tensor in own.items():
            src = source.get(name)
            if name in keep:
                continue
            if src is not None and src.shape == tensor.shape:
                tensor.copy_(src)
            else:
                fresh.append(name)
    return fresh
