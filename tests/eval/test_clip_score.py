"""CLIP score from a user-supplied checkpoint: a tiny CLIP in the OpenAI layout, written and trained here.

The reference network below follows OpenAI's CLIP code (seq-first ``nn.MultiheadAttention`` blocks,
class token, ``x @ proj``, text pooled at the EOT token); rqvae converts its files to transformers'
CLIPModel, so agreement with the embeddings computed here checks the conversion.
"""

import gzip
import importlib.util
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from rqvae.cli import main
from rqvae.data.images import save_image
from rqvae.errors import UserError
from rqvae.eval.clip_convert import load_clip_tokenizer
from rqvae.eval.clip_score import clip_score, clip_score_folder, load_clip, tokenize

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI's preprocessing
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1),
           "black": (0, 0, 0)}
MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "w h", "wh i", "whi t", "whit e</w>"]
CTX, IMAGE, PATCH = 12, 32, 8


# ------------------------------------------------------------------------------- reference CLIP (OpenAI)
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, act):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):  # x (L, B, W)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, act):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, act) for _ in range(layers)])

    def forward(self, x, mask=None):  # (B, L, W) -> (B, L, W)
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return x.permute(1, 0, 2)


class Visual(nn.Module):
    def __init__(self, width, embed, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        tokens = (IMAGE // PATCH) ** 2 + 1
        self.positional_embedding = nn.Parameter(torch.randn(tokens, width) * width ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, 2, act)
        self.proj = nn.Parameter(torch.randn(width, embed) * width ** -0.5)

    def forward(self, x):  # (B, 3, S, S) normalised -> (B, E)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        return self.ln_post(self.transformer(x)[:, 0]) @ self.proj


class TinyClip(nn.Module):
    def __init__(self, vocab, act=QuickGELU, width=128, text_width=128, embed=32):
        super().__init__()
        self.visual = Visual(width, embed, act)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, text_width) * 0.01)
        self.transformer = Transformer(text_width, 1, act)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, images):  # (B, 3, S, S) in [-1, 1] -> (B, E)
        return self.visual(((images + 1) / 2 - MEAN) / STD)

    def encode_text(self, ids):  # (B, CTX) -> (B, E), pooled at EOT (the largest id)
        mask = torch.full((CTX, CTX), float("-inf")).triu(1)
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding, mask)
        return self.ln_final(x)[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection

    def forward(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


# ------------------------------------------------------------------------------------------ helpers
def write_bpe(path: Path, merges=MERGES) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["tiny test vocabulary#version: 0.2", *merges]))  # no final newline, as CLIP's
    return path


def vocab_size(merges=MERGES) -> int:
    return 512 + len(merges) + 2


def colour_images(names, size=(IMAGE, IMAGE), noise=0.0, generator=None):
    rgb = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) * 2 - 1  # (B, 3)
    x = rgb.view(-1, 3, 1, 1).expand(-1, -1, *size)
    return (x + noise * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def direct_score(model, images, ids):
    with torch.no_grad():
        a, b = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(ids), dim=-1)
    return (100 * (a * b).sum(-1).clamp(min=0)).mean().item()


def quantised(images):  # what the score sees: the 8-bit values of a PNG
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP trained for a few steps to match colour images with colour names, saved as open_clip."""
    d = tmp_path_factory.mktemp("clip")
    bpe = write_bpe(d / "bpe.txt.gz")
    names = list(COLOURS)
    ids = tokenize(load_clip_tokenizer(bpe), names, CTX)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyClip(vocab_size())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(30):
        img, txt = model(colour_images(names, noise=0.3, generator=g), ids)
        logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
        target = torch.arange(len(names))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), d / "tiny.pt")
    return model, d / "tiny.pt", bpe


# ------------------------------------------------------------------------------------------ tests
def test_matching_pairs_score_higher_and_the_number_is_the_direct_one(trained):
    model, weights, bpe = trained
    clip = load_clip(weights, tokenizer=bpe)
    names = list(COLOURS) * 2
    images = colour_images(names, noise=0.3, generator=torch.Generator().manual_seed(5))
    shuffled = names[1:] + names[:1]  # every image paired with another colour's name
    match = clip_score(images, names, clip, batch_size=5)
    other = clip_score(images, shuffled, clip, batch_size=5)
    assert match["n"] == other["n"] == len(names)
    assert match["score"] > other["score"] + 10
    tok = clip.tokenizer
    for caps, got in [(names, match), (shuffled, other)]:
        expected = direct_score(model, quantised(images), tokenize(tok, caps, CTX))
        assert got["score"] == pytest.approx(expected, abs=1e-4)


def test_folder_of_pngs_with_captions_jsonl_scores_like_the_tensors(trained, tmp_path):
    _, weights, bpe = trained
    names = list(COLOURS)
    images = colour_images(names, noise=0.3, generator=torch.Generator().manual_seed(7))
    (tmp_path / "samples").mkdir()
    rows = []
    for i, (x, name) in enumerate(zip(images, names)):
        save_image(x, tmp_path / "samples" / f"{i:03d}.png")
        rows.append({"file": f"{i:03d}.png" if i % 2 else f"samples/{i:03d}.png", "text": name})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = clip_score_folder(tmp_path / "samples", tmp_path / "captions.jsonl", weights, tokenizer=bpe,
                            batch_size=4)
    assert got["n"] == len(names)
    assert got["score"] == pytest.approx(clip_score(images, names, weights, tokenizer=bpe)["score"], abs=1e-4)
    (tmp_path / "samples" / "003.png").unlink()
    with pytest.raises(UserError, match="003.png"):
        clip_score_folder(tmp_path / "samples", tmp_path / "captions.jsonl", weights, tokenizer=bpe)


def test_images_are_resized_and_cropped_and_grayscale_expanded(trained):
    _, weights, bpe = trained
    clip = load_clip(weights, tokenizer=bpe)
    names = ["red", "blue", "white", "black"]
    small = clip_score(colour_images(names), names, clip)["score"]
    larger = clip_score(colour_images(names, size=(48, 40)), names, clip)["score"]
    assert larger == pytest.approx(small, abs=1e-3)
    gray = colour_images(["white", "black"])[:, :1]  # (2, 1, S, S)
    assert clip_score(gray, ["white", "black"], clip)["score"] == pytest.approx(
        clip_score(gray.expand(-1, 3, -1, -1), ["white", "black"], clip)["score"], abs=1e-5)


def _save(model, path: Path, fmt: str) -> Path:
    sd = model.state_dict()
    if fmt == "openai_torchscript":
        ids = torch.zeros(1, CTX, dtype=torch.long)
        ids[0, :3] = torch.tensor([vocab_size() - 2, 5, vocab_size() - 1])
        torch.jit.trace(model, (torch.zeros(1, 3, IMAGE, IMAGE), ids), check_trace=False).save(str(path))
    elif fmt == "open_clip_training_checkpoint":
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors_fp16":
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
        model.load_state_dict({k: v.half().float() for k, v in sd.items()})  # the values the file holds
    return path


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["openai_torchscript", "open_clip_training_checkpoint", "safetensors_fp16"])
def test_checkpoint_formats_and_gelu_variant(tmp_path, fmt):
    torch.manual_seed(3)
    quick = fmt != "safetensors_fp16"  # open_clip models trained with nn.GELU
    model = TinyClip(vocab_size(), act=QuickGELU if quick else nn.GELU).eval()
    suffix = ".safetensors" if fmt.startswith("safetensors") else ".pt"
    weights = _save(model, tmp_path / f"model{suffix}", fmt)
    bpe = write_bpe(tmp_path / "bpe.txt.gz")
    caps = ["red", "blue green", "a white image", "yellow   &amp; black!"]
    g = torch.Generator().manual_seed(0)
    images = colour_images(["red", "blue", "white", "yellow"], noise=0.5, generator=g)
    got = clip_score(images, caps, weights, tokenizer=bpe, quick_gelu=quick)
    ids = tokenize(load_clip_tokenizer(bpe), caps, CTX)
    assert got["score"] == pytest.approx(direct_score(model, quantised(images), ids), abs=1e-4)


def test_bpe_file_ids_follow_openai_vocabulary_order(tmp_path):
    tok = load_clip_tokenizer(write_bpe(tmp_path / "bpe.txt.gz"))
    v = vocab_size()
    red = 512 + MERGES.index("re d</w>")
    a, b_end = ord("a") - ord("!"), 256 + ord("b") - ord("!")  # printable ASCII bytes come first, in order
    ids = tokenize(tok, ["Red  RED", "ab", "red " * 40], CTX)
    assert ids[0].tolist() == [v - 2, red, red, v - 1] + [0] * (CTX - 4)
    assert ids[1].tolist() == [v - 2, a, b_end, v - 1] + [0] * (CTX - 4)
    assert ids[2].tolist() == [v - 2] + [red] * (CTX - 2) + [v - 1]  # cut, EOT kept last
    folder = tmp_path / "hf_tokenizer"
    tok.save_pretrained(str(folder))  # a saved Hugging Face tokenizer folder works as well
    assert torch.equal(tokenize(load_clip_tokenizer(folder), ["Red  RED", "ab"], CTX), ids[:2])


def _open_clip_simple_tokenizer():
    """open_clip's reference tokenizer, loaded from its file (the package's import needs torchvision)."""
    pytest.importorskip("ftfy")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    folder = Path(list(spec.submodule_search_locations)[0])
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", folder / "tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer, folder / "bpe_simple_vocab_16e6.txt.gz"


def test_tokens_match_open_clip_simple_tokenizer(tmp_path):
    simple_tokenizer, real_bpe = _open_clip_simple_tokenizer()
    caps = ["A photo of a cat.", "Two dogs   playing in the SNOW!!", "l'été à Paris, 2019 — café's",
            "don't stop 12345 &amp; more", "emoji 😀 test", "hello-world_foo/bar", "red " * 100]
    for bpe in [write_bpe(tmp_path / "bpe.txt.gz"), real_bpe]:
        ref = simple_tokenizer(str(bpe))
        expected = torch.stack([ref(c, context_length=77)[0] for c in caps])
        assert torch.equal(tokenize(load_clip_tokenizer(bpe), caps, 77), expected.long())


def test_bad_files_are_one_line_user_errors(trained, tmp_path):
    model, weights, bpe = trained
    sd = model.state_dict()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    not_clip = tmp_path / "vae.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, not_clip)
    variant = tmp_path / "variant.pt"
    torch.save(dict(sd, **{"visual.attn_pool.query": torch.zeros(4)}), variant)
    cases = [(tmp_path / "missing.pt", bpe, "does not exist"), (garbage, bpe, "not a CLIP checkpoint"),
             (not_clip, bpe, "not a CLIP ViT checkpoint"), (variant, bpe, "not supported"),
             (weights, write_bpe(tmp_path / "other.txt.gz", MERGES[:3]), "tokenizer has"),
             (weights, tmp_path / "no_bpe.txt.gz", "does not exist")]
    for path, tok, message in cases:
        with pytest.raises(UserError, match=message) as e:
            load_clip(path, tokenizer=tok)
        assert "\n" not in str(e.value)


def test_cli_eval_clip_score(trained, tmp_path, capsys):
    _, weights, bpe = trained
    names = list(COLOURS)
    images = colour_images(names, noise=0.3, generator=torch.Generator().manual_seed(7))
    rows = []
    for i, (x, name) in enumerate(zip(images, names)):
        save_image(x, tmp_path / "samples" / f"{i:03d}.png")
        rows.append({"file": f"{i:03d}.png", "text": name})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--clip-score", str(tmp_path / "samples"), "--captions",
                 str(tmp_path / "captions.jsonl"), "--clip-weights", str(weights),
                 "--clip-tokenizer", str(bpe), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())["clip"]
    assert res["n"] == len(names)
    assert res["score"] == pytest.approx(clip_score(images, names, weights, tokenizer=bpe)["score"], abs=1e-4)
    assert "CLIP score" in capsys.readouterr().out
    assert main(["eval", "--clip-score", str(tmp_path / "samples")]) == 2
    assert "--captions" in capsys.readouterr().err
