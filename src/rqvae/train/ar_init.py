"""Stage 2 from a trained RQ-Transformer (``train-ar --init-from DIR``) and the model config of a run.

The model config of a run from scratch is the preset with ``--model-config`` and the fields the data and
the RQ-VAE fix (code shape, K, n_z, condition kind, class count and names, text vocabulary). With
``--init-from`` it is the loaded model's config instead, with the same data fields, which must agree with
the model's except the class count: a class model fine-tuned on data with another number of classes gets
new class embeddings (and a new null row), everything else is loaded. The RQ-Transformer embeds codes with
its RQ-VAE's codebook (a buffer): a ``--vae`` whose codebook differs from the stored one (a fine-tuned
tokenizer) is refused unless ``--allow-new-codebook``, which puts the new codebook in its place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rqvae.errors import UserError
from rqvae.models.transformer import AR_PRESETS, RQTransformer, RQTransformerConfig
from rqvae.train.finetune import AR_DATA_FIELDS, AR_TRAINING_FIELDS, transfer_weights, with_architecture_of

DEFAULT_PRESET = "fmnist-small"


def data_fields(cfg: Any, vae: Any, cond: Any, code_hw: tuple[int, int]) -> dict[str, Any]:
    """The config fields that the RQ-VAE, the data and ``--cond-dropout`` fix."""
    vc = vae.config
    fields: dict[str, Any] = dict(code_shape=(code_hw[0], code_hw[1], vc.depth), vocab_size=vc.codebook_size,
                                  embed_dim=vc.embed_dim, cond_type=cond.kind, cond_len=1)
    if cond.kind == "class":
        fields.update(num_classes=cond.num_classes, class_names=tuple(cond.class_names or ()))
    if cond.kind == "text":
        fields.update(text_vocab_size=cond.tokenizer.get_vocab_size(), cond_len=cond.values.shape[1])
    if cfg.cond_dropout is not None:
        fields["cfg_dropout"] = cfg.cond_dropout
    elif cond.kind == "uncond":
        fields["cfg_dropout"] = 0.0
    return fields


def _check_known(fields: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(RQTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"unknown RQ-Transformer config fields {unknown}; valid fields: {sorted(known)}")


def scratch_config(cfg: Any, data: dict[str, Any]) -> RQTransformerConfig:
    """A run from scratch: the preset, ``--model-config`` over it, the data fields over both."""
    fields = {**cfg.model, **data}
    _check_known(fields)
    return dataclasses.replace(AR_PRESETS[cfg.preset or DEFAULT_PRESET], **fields)


def init_config(cfg: Any, loaded: RQTransformerConfig, data: dict[str, Any]) -> RQTransformerConfig:
    """``--init-from``: the loaded model's config with the data fields (checked against it)."""
    _check_known(dict(cfg.model))
    for key in ("code_shape", "vocab_size", "embed_dim"):
        mine, theirs = data[key], getattr(loaded, key)
        if mine != theirs:
            raise UserError(f"--init-from {cfg.init_from} models codes with {key}={theirs}, but the RQ-VAE "
                            f"{cfg.vae} gives {key}={mine}; train on the codes of an RQ-VAE of that shape")
    if data["cond_type"] != loaded.cond_type:
        raise UserError(f"--init-from {cfg.init_from} is a {loaded.cond_type!r} model; train it with --cond "
                        f"{loaded.cond_type}")
    if loaded.cond_type == "text" and (data["text_vocab_size"], data["cond_len"]) != \
            (loaded.text_vocab_size, loaded.cond_len):
        raise UserError(f"--init-from {cfg.init_from} has a text vocabulary of {loaded.text_vocab_size} and "
                        f"{loaded.cond_len} text tokens, the tokenizer gives {data['text_vocab_size']} and "
                        f"{data['cond_len']}; use the model's tokenizer (--tokenizer, --text-len)")
    requested = dict(cfg.model)
    if cfg.preset is not None:  # the architecture fields of an explicitly given preset
        preset = dataclasses.asdict(AR_PRESETS[cfg.preset])
        requested = {**{k: v for k, v in preset.items() if k not in AR_DATA_FIELDS | AR_TRAINING_FIELDS},
                     **requested}
    base = with_architecture_of(loaded, requested, source=cfg.init_from, training_fields=AR_TRAINING_FIELDS,
                                ignored=AR_DATA_FIELDS)
    if cfg.cond_dropout is None and loaded.cond_type != "uncond":
        data = {k: v for k, v in data.items() if k != "cfg_dropout"}  # keep the model's condition dropout
    return dataclasses.replace(base, **data)


def check_codebook(cfg: Any, loaded: RQTransformer, codebook: torch.Tensor) -> bool:
    """True when the RQ-VAE's codebook differs from the one the loaded model was trained on (allowed with
    ``--allow-new-codebook``; refused otherwise)."""
    old = loaded.codebook.detach().float().cpu()
    new = codebook.detach().float().cpu()
    if old.shape == new.shape and torch.equal(old, new):
        return False
    if not cfg.allow_new_codebook:
        raise UserError(f"the RQ-VAE {cfg.vae} has another codebook than the one --init-from {cfg.init_from} "
                        "was trained on (a fine-tuned tokenizer?), so its codes mean other things: pass the "
                        "original RQ-VAE, or --allow-new-codebook to fine-tune on the new codes")
    return True


def load_into(model: RQTransformer, loaded: RQTransformer) -> list[str]:
    """Copy the loaded weights into ``model`` (its codebook buffer stays: the --vae's); returns notes on what
    is new. Class embeddings of the same class count keep their rows when only the null row changed."""
    fresh = transfer_weights(model, loaded.state_dict(), keep=("codebook",))
    notes = []
    old, new = loaded.config, model.config
    if "cond_emb.weight" in fresh:
        if new.cond_type == "class" and new.num_classes == old.num_classes:
            with torch.no_grad():
                model.cond_emb.weight[:new.num_classes].copy_(loaded.cond_emb.weight[:old.num_classes])
            notes.append("a new null-condition row (for --cond-dropout), the class embeddings loaded")
        elif new.cond_type == "class":
            notes.append(f"{old.num_classes} -> {new.num_classes} classes: new class embeddings "
                         f"({new.num_classes}{' + null row' if new.has_null_cond else ''}), the rest loaded")
        fresh.remove("cond_emb.weight")
    if fresh:
        notes.append(f"newly initialised: {', '.join(fresh)}")
    return notes
