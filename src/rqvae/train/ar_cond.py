"""What a stage-2 model is conditioned on (class labels, captions as text tokens, or nothing), and the
sample grids drawn from it during training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rqvae.data.features import dataset_files
from rqvae.data.images import make_grid
from rqvae.data.text import captions_for_files, encode_texts, load_tokenizer, pad_id, train_tokenizer
from rqvae.errors import UserError
from rqvae.eval.figures import label_grid


# ------------------------------------------------------------------------------------- conditions
@dataclass
class Conditions:
    """What the model is conditioned on, per cached item (rows of the feature cache)."""

    kind: str  # "uncond" | "class" | "text"
    values: torch.Tensor  # (N,) class ids / zeros, or (N, L) text tokens
    num_classes: int = 1
    class_names: list[str] | None = None
    tokenizer: Any = None  # tokenizers.Tokenizer for text
    pad_id: int = 0
    prompts: list[str] | None = None  # a few captions for sample grids


def dataset_captions(cfg: Any, ds: Any) -> list[str]:

    if cfg.captions == "classes":  # e.g. Fashion-MNIST: the class name is the caption
        names = list(getattr(ds, "class_names", []))
        labels = getattr(ds, "labels", None)
        if not names or labels is None:
            raise UserError("--captions classes needs a dataset with class names and labels")
        return [names[int(i)] for i in labels]
    files = dataset_files(ds)
    if files is None:
        raise UserError(f"the dataset {cfg.data} has no image files to find captions beside; give "
                        "--captions FILE.jsonl with a folder dataset, or --captions classes")
    return captions_for_files(files, cfg.captions, root=getattr(ds, "root", None))


def build_conditions(cfg: Any, ds: Any, labels: torch.Tensor, captions: list[str] | None) -> Conditions:
    if cfg.cond == "uncond":
        return Conditions("uncond", torch.zeros_like(labels))
    if cfg.cond == "class":
        names = list(getattr(ds, "class_names", [])) or [str(i) for i in range(int(labels.max()) + 1)]
        return Conditions("class", labels, num_classes=len(names), class_names=names)

    assert captions is not None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer, max_len=cfg.text_len)
    else:
        tok = train_tokenizer(captions, vocab_size=cfg.text_vocab_size, max_len=cfg.text_len)
    tokens = encode_texts(tok, captions)  # (N, L)
    prompts = list(dict.fromkeys(captions))[:8]
    return Conditions("text", tokens, tokenizer=tok, pad_id=pad_id(tok), prompts=prompts)


# ---------------------------------------------------------------------------------------- samples
@torch.no_grad()
def sample_grid(model: Any, vae: Any, cond: Conditions, n_per_cond: int, seed: int,
                top_k: int | None = None, top_p: float | None = None,
                device: torch.device | str = "cpu", bf16: bool = False) -> torch.Tensor:
    """Samples decoded by the VAE as one grid (C, H, W) in [-1, 1]: a row per class for class models,
    a row per prompt for text models (each row labelled with its class name or prompt on the left), rows
    of 8 for unconditional ones. ``generate`` picks its own compute dtype (bf16 where the hardware has fast
    bf16 matmuls) unless ``bf16`` is False (then float32)."""
    labels: list[str] = []
    if cond.kind == "class":
        c = torch.arange(cond.num_classes).repeat_interleave(n_per_cond)  # (n_classes * n,)
        nrow = n_per_cond
        labels = list(cond.class_names or [str(i) for i in range(cond.num_classes)])
    elif cond.kind == "text":
        labels = list(cond.prompts or [""])
        c = encode_texts(cond.tokenizer, labels).repeat_interleave(n_per_cond, dim=0)  # (N, L)
        nrow = n_per_cond
    else:
        c = torch.zeros(max(8, n_per_cond * 4), dtype=torch.long)
        nrow = 8
    was_training = model.training
    model.eval()
    g = torch.Generator(device=torch.device(device)).manual_seed(seed)
    codes = model.generate(c.to(device), top_k=top_k, top_p=top_p, generator=g,
                           dtype=None if bf16 else torch.float32)  # (N, h, w, D)
    model.train(was_training)
    images = vae.decode(codes.to(device)).float().clamp(-1, 1).cpu()  # (N, C, H, W)
    return label_grid(make_grid(images, nrow=nrow), row_labels=labels)
