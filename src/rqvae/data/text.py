"""Captions and the BPE text tokenizer for text-conditioned RQ-Transformers.

Text models (the paper's CC-3M model) prepend ``L`` text tokens (32 in the official configs, BPE
vocabulary 16384) to the image codes. Here a caption comes either from a ``.txt`` file beside each
image (``cat.png`` -> ``cat.txt``) or from a JSONL file with one ``{"file": ..., "text": ...}`` per
line. Tokens come from a byte-level BPE tokenizer (the ``tokenizers`` library) trained on the
captions, or from a ``tokenizer.json`` the user gives. The tokenizer is saved as ``tokenizer.json``
in the model folder so that sampling (``rqvae sample --text``) encodes prompts the same way.

Every caption becomes exactly ``max_len`` token ids: truncated if longer, right-padded with the
``[PAD]`` id if shorter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from rqvae.errors import UserError

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
TOKENIZER_NAME = "tokenizer.json"
DEFAULT_MAX_LEN = 32  # official CC-3M config: 32 text tokens
DEFAULT_VOCAB_SIZE = 16384  # official CC-3M config


def read_captions_jsonl(path: str | os.PathLike) -> dict[str, str]:
    """Read ``{"file": ..., "text": ...}`` lines into a dict file -> caption (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist; pass a JSONL file with "
                        '{"file": ..., "text": ...} per line')
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); "
                                'each line must be {"file": ..., "text": ...}') from None
            if not isinstance(row, dict) or not isinstance(row.get("file"), str) \
                    or not isinstance(row.get("text"), str):
                raise UserError(f'{path}:{n} must be an object with string fields "file" and "text"')
            out[row["file"]] = row["text"]
    if not out:
        raise UserError(f"captions file {path} holds no captions")
    return out


def captions_for_files(image_paths: Sequence[str | os.PathLike],
                       captions_file: str | os.PathLike | None = None,
                       root: str | os.PathLike | None = None) -> list[str]:
    """One caption per image, in the order of ``image_paths``.

    With ``captions_file`` (JSONL) an entry's ``file`` may be an absolute path, a path relative to
    ``root`` (the dataset folder) or to the JSONL file's folder, or a bare file name when that name is
    unique in the dataset. Without it, each image's caption is the text file beside it with the same
    stem (``a/b.png`` -> ``a/b.txt``). An image without a caption is an error naming the fix.
    """
    paths = [Path(p) for p in image_paths]
    captions: list[str | None] = [None] * len(paths)
    if captions_file is not None:
        table = read_captions_jsonl(captions_file)
        bases = [Path(root)] if root is not None else []
        bases.append(Path(captions_file).parent)
        lookup: dict[str, str] = {}
        for key, text in table.items():
            k = Path(key)
            if k.is_absolute():
                lookup[str(k.resolve())] = text
            else:
                for base in bases:
                    lookup.setdefault(str((base / k).resolve()), text)
        names: dict[str, int] = {}
        for p in paths:
            names[p.name] = names.get(p.name, 0) + 1
        for i, p in enumerate(paths):
            text = lookup.get(str(p.resolve()))
            if text is None and names[p.name] == 1:
                text = table.get(p.name)
            captions[i] = text
    else:
        for i, p in enumerate(paths):
            txt = p.with_suffix(".txt")
            if txt.is_file():
                captions[i] = txt.read_text(encoding="utf-8", errors="replace").strip()
    missing = [p for p, c in zip(paths, captions) if c is None]
    if missing:
        where = f"an entry in {captions_file}" if captions_file is not None else \
            f"a text file beside it ({missing[0].with_suffix('.txt').name}) or --captions FILE.jsonl"
        raise UserError(f"{len(missing)} of {len(paths)} images have no caption (first: {missing[0]}); "
                        f"add {where}")
    return [c for c in captions if c is not None]


def train_tokenizer(captions: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    max_len: int = DEFAULT_MAX_LEN, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the captions (NFKC + lowercase; no unknown characters).

    The vocabulary holds ``[PAD]`` (id 0), ``[UNK]`` (id 1), the 256 byte symbols and up to
    ``vocab_size`` entries of merges learned from the captions; small caption sets end up smaller.
    """
    captions = list(captions)
    if not captions:
        raise UserError("no captions to train a tokenizer on; give captions or --tokenizer tokenizer.json")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise UserError(f"--text-vocab-size {vocab_size} is too small; byte-level BPE needs at least "
                        f"{len(alphabet) + 2}")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD_TOKEN, UNK_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    return set_length(tok, max_len)


def set_length(tok: Tokenizer, max_len: int) -> Tokenizer:
    """Make every encoding exactly ``max_len`` ids: truncate, then right-pad with ``[PAD]``."""
    if max_len < 1:
        raise UserError(f"--text-len must be at least 1, got {max_len}")
    pad_id = tok.token_to_id(PAD_TOKEN)
    if pad_id is None:
        raise UserError(f"the tokenizer has no {PAD_TOKEN} token; train one with rqvae (or add {PAD_TOKEN} "
                        "to its special tokens)")
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(direction="right", pad_id=pad_id, pad_token=PAD_TOKEN, length=max_len)
    return tok


def load_tokenizer(path: str | os.PathLike, max_len: int | None = None) -> Tokenizer:
    """Load a ``tokenizer.json`` (a file, or a model folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; pass a tokenizer.json made by the "
                        "tokenizers library (or let train-ar train one from the captions)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises its own exception type
        raise UserError(f"{path} is not a valid tokenizer.json ({e})") from None
    if max_len is None:
        padding = tok.padding
        max_len = padding["length"] if padding and padding.get("length") else DEFAULT_MAX_LEN
    return set_length(tok, max_len)


def save_tokenizer(tok: Tokenizer, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / TOKENIZER_NAME
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return out


def pad_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(PAD_TOKEN)
    if i is None:
        raise UserError(f"the tokenizer has no {PAD_TOKEN} token")
    return i


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Captions -> token ids (N, max_len) int64, truncated and right-padded."""
    if isinstance(texts, str):
        texts = [texts]
    encodings = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (N, L)
    return ids.reshape(len(texts), -1)
