"""OpenAI / open_clip CLIP checkpoints -> a transformers ``CLIPModel`` and ``CLIPTokenizer``, offline.

The CLIP network itself is transformers' ``CLIPModel`` (a maintained implementation of the CLIP ViT
architecture; open_clip's own model code cannot be imported here because open_clip imports torchvision,
which does not work beside the pinned torch). This module only reads a checkpoint file, infers the
architecture from the tensor shapes and renames / splits the tensors:

* OpenAI ``.pt`` files (e.g. ``ViT-B-32.pt``) are TorchScript archives: their ``state_dict()`` is read
  with ``torch.jit.load``. TorchScript holds no pickled Python objects, but it does hold code for the
  TorchScript interpreter: pass only files from sources you trust.
* open_clip files are plain state dicts (``.bin`` / ``.pt``, read with ``torch.load(weights_only=True)``,
  optionally wrapped as ``{"state_dict": ...}`` with ``module.`` prefixes from DDP) or ``.safetensors``.

Only ViT image towers with a class token and the standard text transformer are supported (every OpenAI
ViT and the open_clip ViT-B/L/H models); attention heads are ``width // 64`` as in both codebases. The
activation cannot be read from the weights: OpenAI models use QuickGELU (``quick_gelu=True``, the
default); open_clip models trained without ``-quickgelu`` in their name use GELU.

The tokenizer is CLIP's BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz``, turned into the vocab/merges of
transformers' ``CLIPTokenizer``. By default it is the copy inside the open-clip-torch wheel, found by
path without importing open_clip (install it with ``pip install --no-deps open-clip-torch``); any file
in that format, or a folder holding a saved Hugging Face CLIP tokenizer, can be given instead. Nothing
is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rqvae.errors import UserError
from rqvae.models.hub import load_torch_file_safely

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_MERGES = 49152 - 256 - 2  # how many merges OpenAI's SimpleTokenizer reads from the file
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
HEAD_WIDTH = 64  # OpenAI and open_clip: heads = width // 64
# Keys in CLIP files that hold no weights of the network (OpenAI: build metadata; open_clip: the text mask)
IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias"}
_LAYER_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_LAYER_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}


# ------------------------------------------------------------------------------------------ files
def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI TorchScript ``.pt``, an open_clip ``.bin`` / ``.pt`` / ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CLIP weights file {path} does not exist; pass an OpenAI or open_clip ViT "
                        "checkpoint file (e.g. ViT-B-32.pt)")
    if path.suffix == ".safetensors":
        try:
            sd: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    elif not zipfile.is_zipfile(path) and _first_byte(path) != b"\x80":  # torch.save: a zip or a pickle
        raise UserError(f"{path} is not a CLIP checkpoint (not a torch, TorchScript or safetensors file); "
                        "pass an OpenAI or open_clip ViT checkpoint file")
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:  # RuntimeError / ValueError from the TorchScript loader
            raise UserError(f"{path} is not a readable TorchScript archive ({type(e).__name__}); "
                            "is the file complete?") from None
    else:
        sd = load_torch_file_safely(path)
    if isinstance(sd.get("state_dict"), dict):  # an open_clip training checkpoint
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a CLIP checkpoint (it holds values other than tensors)")
    return {k: v.float() for k, v in sd.items()}


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:120]


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder (torch.save files have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


# ------------------------------------------------------------------------------------------ weights
def clip_config(sd: dict[str, torch.Tensor], *, quick_gelu: bool = True, source: str = "") -> Any:
    """A transformers ``CLIPConfig`` read off the tensor shapes of an OpenAI-layout state dict."""
    from transformers import CLIPConfig  # optional dependency, slow to import

    need = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "token_embedding.weight", "positional_embedding", "text_projection"]
    missing = [k for k in need if k not in sd]
    if missing:
        resnet = "visual.layer1.0.conv1.weight" in sd
        hint = " (a ResNet CLIP: only ViT models are supported)" if resnet else ""
        raise UserError(f"{source} is not a CLIP ViT checkpoint in the OpenAI/open_clip layout: no "
                        f"{missing[0]!r}{hint}; pass e.g. OpenAI's ViT-B-32.pt")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["token_embedding.weight"].shape[1]
    embed_dim = sd["visual.proj"].shape[1]
    if sd["text_projection"].shape != (text_width, embed_dim):
        raise UserError(f"{source}: text_projection has shape {tuple(sd['text_projection'].shape)}, "
                        f"expected {(text_width, embed_dim)}; not a standard CLIP checkpoint")
    act = "quick_gelu" if quick_gelu else "gelu"

    def tower(prefix: str, w: int) -> dict[str, Any]:
        matches = [m for k in sd if (m := _LAYER_KEY.fullmatch(k))]
        layers = {int(m.group(2)) for m in matches if (m.group(1) or "") == prefix}
        return dict(hidden_size=w, num_hidden_layers=len(layers), num_attention_heads=max(1, w // HEAD_WIDTH),
                    intermediate_size=sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    projection_dim=embed_dim, hidden_act=act)

    vocab, context = sd["token_embedding.weight"].shape[0], sd["positional_embedding"].shape[0]
    text = tower("", text_width) | dict(vocab_size=vocab, max_position_embeddings=context,
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    vision = tower("visual.", width) | dict(image_size=grid * patch, patch_size=patch)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def convert_state_dict(sd: dict[str, torch.Tensor], *, source: str = "") -> dict[str, torch.Tensor]:
    """OpenAI/open_clip keys -> transformers ``CLIPModel`` keys (q/k/v split, projections transposed).
    A key that is neither converted nor known metadata is an error: it means an architecture variant
    (layer scale, attention pooling, ...) that this conversion would silently get wrong."""
    v, t = "vision_model.", "text_model."
    direct = {
        "visual.class_embedding": v + "embeddings.class_embedding",
        "visual.conv1.weight": v + "embeddings.patch_embedding.weight",
        "visual.positional_embedding": v + "embeddings.position_embedding.weight",
        "token_embedding.weight": t + "embeddings.token_embedding.weight",
        "positional_embedding": t + "embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    for old, new in [("visual.ln_pre", v + "pre_layrnorm"), ("visual.ln_post", v + "post_layernorm"),
                     ("ln_final", t + "final_layer_norm")]:
        direct |= {f"{old}.weight": f"{new}.weight", f"{old}.bias": f"{new}.bias"}
    out: dict[str, torch.Tensor] = {}
    for key, x in sd.items():
        if key in direct:
            out[direct[key]] = x
        elif key in ("visual.proj", "text_projection"):  # (width, embed) used as x @ proj
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = x.t()
        elif m := _LAYER_KEY.fullmatch(key):
            tower_prefix = (v if m.group(1) else t) + f"encoder.layers.{m.group(2)}."
            out.update(_convert_layer_key(m.group(3), x, tower_prefix, source))
        elif key not in IGNORED_KEYS:
            raise UserError(f"{source} holds {key!r}, which is not part of the standard CLIP ViT "
                            "architecture; this model variant is not supported")
    out.setdefault("logit_scale", torch.tensor(4.6052))  # unused by the score
    return {k: x.contiguous() for k, x in out.items()}


def _convert_layer_key(name: str, x: torch.Tensor, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """One residual-block tensor: ``attn.in_proj_*`` (3W, ...) splits into q/k/v; the rest is renamed."""
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]
        q, k, v = x.chunk(3, dim=0)
        return {f"{prefix}self_attn.{p}_proj.{kind}": y for p, y in zip("qkv", (q, k, v))}
    module, _, kind = name.rpartition(".")
    if module not in _LAYER_NAMES:
        raise UserError(f"{source} holds a residual block tensor {name!r} that the standard CLIP "
                        "architecture has not; this model variant is not supported")
    return {f"{prefix}{_LAYER_NAMES[module]}.{kind}": x}


def build_clip_model(sd: dict[str, torch.Tensor], *, quick_gelu: bool = True, source: str = "") -> Any:
    """A transformers ``CLIPModel`` (eval mode) holding the weights of an OpenAI-layout state dict."""
    from transformers import CLIPModel  # optional dependency, slow to import

    model = CLIPModel(clip_config(sd, quick_gelu=quick_gelu, source=source))
    weights = convert_state_dict(sd, source=source)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers rebuilt by the model
    if missing or unexpected:
        raise UserError(f"{source} does not fit the CLIP architecture read from its shapes (missing "
                        f"{missing[:2]}, unexpected {unexpected[:2]}); this model variant is not supported")
    return model.eval()


# ------------------------------------------------------------------------------------------ tokenizer
def default_bpe_path() -> Path:
    """CLIP's BPE vocabulary inside the open-clip-torch wheel, located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")  # finds the package folder; runs none of its code
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    raise UserError(f"CLIP's BPE vocabulary ({BPE_FILE}) was not found; run `pip install --no-deps "
                    "open-clip-torch` (it ships the file) or pass a tokenizer file or folder")


def _bytes_to_unicode() -> list[str]:
    """The 256 symbols byte-level BPE uses for the bytes 0..255, in the order of CLIP's vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0  # printable bytes stand for themselves; the others get 256, 257, ...
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def read_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz`` format -> (vocab, merges), with the ids OpenAI's
    SimpleTokenizer gives: 256 byte symbols, the same with ``</w>``, one per merge, then SOT and EOT."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:BPE_MERGES + 1]  # line 0 is a version header
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a gzipped CLIP BPE vocabulary ({e}); pass {BPE_FILE}") from None
    merges = [tuple(ln.split()) for ln in lines if ln.strip()]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not a CLIP BPE vocabulary (a merge line is not two symbols)")
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def load_clip_tokenizer(source: str | os.PathLike | None = None) -> Any:
    """transformers ``CLIPTokenizer`` from a CLIP BPE file (default: open-clip-torch's) or an HF folder."""
    from transformers import CLIPTokenizer  # optional dependency, slow to import

    path = default_bpe_path() if source is None else Path(source)
    if path.is_dir():
        try:
            return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # OSError / ValueError for folders without vocab files
            raise UserError(f"{path} is not a saved CLIP tokenizer folder ({_first_line(e)})") from None
    if not path.is_file():
        raise UserError(f"CLIP tokenizer {path} does not exist; pass {BPE_FILE} or a tokenizer folder")
    vocab, merges = read_bpe(path)
    return CLIPTokenizer(vocab=vocab, merges=merges)
