"""CLIP score (paper Table 3): how well generated images match their captions, under CLIP ViT-B/32.

    score = mean over (image, caption) pairs of 100 * max(cos(E_image, E_text), 0)

as in Hessel et al. (2021) with w = 100 (torchmetrics' ``CLIPScore`` scale). torchmetrics clamps the
mean instead of each pair; for trained CLIP models, whose cosines are about 0.2-0.4, both agree.

The weights come from a file the user gives (OpenAI's ``ViT-B-32.pt`` for the paper's number, or an
open_clip checkpoint); nothing is downloaded. See :mod:`rqvae.eval.clip_convert` for the formats, the
tokenizer (CLIP's BPE vocabulary from the open-clip-torch wheel, or a file / folder given as
``tokenizer``) and the network (transformers' ``CLIPModel``). Captions are cleaned as OpenAI's tokenizer
does (HTML entities unescaped, whitespace collapsed, lower case) except for its ``ftfy`` mojibake repair.

Images are preprocessed as CLIP's own pipeline does: the shorter side resized to the model's input size
(224 for ViT-B/32, bicubic), a centre crop, CLIP's mean / std; grayscale images become 3 channels.
Tensors are first rounded to the 8-bit values a PNG of them would hold, so a tensor and its saved PNG
score the same.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rqvae.data.images import load_images
from rqvae.data.text import read_captions_jsonl
from rqvae.errors import UserError
from rqvae.eval.batches import progress_bar
from rqvae.eval.clip_convert import build_clip_model, load_clip_tokenizer, read_clip_state_dict
from rqvae.eval.inception import to_uint8_range

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Clip:
    """A CLIP model (transformers ``CLIPModel``, eval mode) with its tokenizer."""

    model: Any
    tokenizer: Any
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1], C = 1 or 3, any size -> (B, E) image embeddings (not normalised)."""
        x = preprocess(images, self.image_size).to(self.device)
        return _features(self.model.get_image_features(pixel_values=x))

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """B captions -> (B, E) text embeddings (not normalised)."""
        ids = tokenize(self.tokenizer, captions, self.context_length).to(self.device)
        return _features(self.model.get_text_features(input_ids=ids))


def tokenize(tokenizer: Any, captions: Sequence[str], context_length: int) -> torch.Tensor:
    """Captions -> (B, context_length) ids as OpenAI's ``clip.tokenize``: SOT, BPE tokens, EOT, then
    zeros; a caption too long is cut so that EOT stays last."""
    texts = [html.unescape(html.unescape(c)).strip() for c in captions]
    ids = tokenizer(texts, truncation=True, max_length=context_length)["input_ids"]
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected embeddings."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(weights: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
              quick_gelu: bool = True, device: str | torch.device = "cpu") -> Clip:
    """CLIP from an OpenAI / open_clip checkpoint file; ``tokenizer``: a CLIP BPE ``.txt.gz`` or a saved
    Hugging Face CLIP tokenizer folder (default: the BPE file in the open-clip-torch wheel).
    ``quick_gelu``: True for OpenAI's models, False for open_clip models trained with GELU."""
    sd = read_clip_state_dict(weights)
    model = build_clip_model(sd, quick_gelu=quick_gelu, source=str(weights)).to(device)
    tok = load_clip_tokenizer(tokenizer)
    text_cfg = model.config.text_config
    if len(tok) != text_cfg.vocab_size or tok.eos_token_id != text_cfg.eos_token_id:
        raise UserError(f"the CLIP tokenizer has {len(tok)} tokens (end token {tok.eos_token_id}), the model "
                        f"{weights} {text_cfg.vocab_size} (end token {text_cfg.eos_token_id}); pass the "
                        "tokenizer the model was trained with")
    return Clip(model=model, tokenizer=tok, path=Path(weights))


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, size, size) CLIP input: 8-bit values, bicubic resize of the
    shorter side to ``size``, centre crop, CLIP mean / std."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"expected images of shape (B, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = to_uint8_range(images) / 255.0
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        shape = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=shape, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def score_batches(clip: Clip, batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> dict[str, Any]:
    """Mean of 100 * max(cos, 0) over all (image, caption) pairs of the batches."""
    total, n = 0.0, 0
    for images, captions in batches:
        img = F.normalize(clip.encode_images(images).float(), dim=-1)  # (B, E)
        txt = F.normalize(clip.encode_text(captions).float(), dim=-1)  # (B, E)
        total += (100 * (img * txt).sum(-1).clamp(min=0)).double().sum().item()
        n += len(captions)
    if n == 0:
        raise UserError("no image/caption pairs to score")
    return {"score": total / n, "n": n}


def _as_clip(clip: Clip | str | os.PathLike, tokenizer: str | os.PathLike | None, device: str | torch.device,
             quick_gelu: bool) -> Clip:
    return clip if isinstance(clip, Clip) else load_clip(clip, tokenizer=tokenizer, quick_gelu=quick_gelu,
                                                         device=device)


def clip_score(images: torch.Tensor, captions: Sequence[str], weights: Clip | str | os.PathLike, *,
               batch_size: int = 64, tokenizer: str | os.PathLike | None = None, quick_gelu: bool = True,
               device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """CLIP score of images (N, C, H, W) in [-1, 1] against their N captions -> {"score", "n"}.
    ``weights``: a checkpoint file (see :func:`load_clip`) or a loaded :class:`Clip`."""
    if images.shape[0] != len(captions):
        raise UserError(f"{images.shape[0]} images but {len(captions)} captions; give one caption per image")
    clip = _as_clip(weights, tokenizer, device, quick_gelu)
    starts = range(0, len(captions), batch_size)
    batches = ((images[i:i + batch_size], captions[i:i + batch_size]) for i in starts)
    return score_batches(clip, progress_bar(batches, len(starts), "CLIP score", progress))


def read_caption_pairs(captions: str | os.PathLike,
                       samples: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """The (image file, caption) pairs of a JSONL file with one ``{"file": ..., "text": ...}`` per line;
    ``file`` is absolute, relative to the JSONL file's folder, or relative to ``samples``."""
    table = read_captions_jsonl(captions)
    bases = [Path(captions).parent] + ([Path(samples)] if samples is not None else [])
    paths: list[Path] = []
    for name in table:
        found = next((p for p in ([Path(name)] if Path(name).is_absolute() else [b / name for b in bases])
                      if p.is_file()), None)
        if found is None:
            where = " or ".join(str(b) for b in bases)
            raise UserError(f"image {name!r} listed in {captions} was not found (looked in {where}); "
                            "fix the path or pass the samples folder")
        paths.append(found)
    return paths, list(table.values())


def _file_batches(paths: list[Path], captions: list[str], size: int,
                  batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    for i in range(0, len(paths), batch_size):  # PIL bicubic resize + centre crop to the CLIP input size
        yield load_images(paths[i:i + batch_size], channels=3, size=size), captions[i:i + batch_size]


def clip_score_folder(samples: str | os.PathLike | None, captions: str | os.PathLike,
                      weights: Clip | str | os.PathLike, *, batch_size: int = 64,
                      tokenizer: str | os.PathLike | None = None, quick_gelu: bool = True,
                      device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """CLIP score of the images listed in a captions JSONL (files relative to it or to ``samples``)."""
    paths, texts = read_caption_pairs(captions, samples)
    clip = _as_clip(weights, tokenizer, device, quick_gelu)
    batches = _file_batches(paths, texts, clip.image_size, batch_size)
    return score_batches(clip, progress_bar(batches, -(-len(paths) // batch_size), "CLIP score", progress))
