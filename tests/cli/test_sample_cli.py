"""``rqvae sample`` end to end on tiny random models (class, text, unconditional) and its user errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from rqvae.cli import main
from rqvae.models.transformer import AR_PRESETS, RQTransformer
from rqvae.models.vae import RQVAE


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    vae = RQVAE.from_preset("tiny")  # K 64, n_z 16, depth 4; 4x4x4 codes decode to 16x16 images
    vae.save_pretrained(root / "vae")
    cb = vae.quantizer.codebook[0]
    small = replace(AR_PRESETS["tiny"], code_shape=(4, 4, 4), vocab_size=64, embed_dim=16)
    RQTransformer(replace(small, cfg_dropout=0.1), codebook=cb).save_pretrained(root / "class")
    RQTransformer(replace(small, cond_type="uncond"), codebook=cb).save_pretrained(root / "uncond")

    from rqvae.data.text import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["a red dress", "a blue shirt", "red shoes", "a blue dress"] * 4, vocab_size=300,
                          max_len=5)
    text = replace(small, cond_type="text", text_vocab_size=tok.get_vocab_size(), cond_len=5)
    RQTransformer(text, codebook=cb).save_pretrained(root / "text")
    save_tokenizer(tok, root / "text")
    other = RQVAE.from_preset("tiny")  # same shapes, another codebook
    other.save_pretrained(root / "other_vae")
    return root


def run(folders: Path, model: str, out: Path, *extra: str) -> int:
    return main(["sample", "--model", str(folders / model), "--vae", str(folders / "vae"), "-o", str(out),
                 "--device", "cpu", *extra])


def test_class_samples_pngs_grid_and_seed(folders, tmp_path, capsys):
    args = ("--class", "1", "3", "--n", "3", "--batch-size", "2", "--top-k", "8", "--top-p", "0.9,0.9,1,1",
            "--cfg-scale", "1.5", "--seed", "7")
    assert run(folders, "class", tmp_path / "a", *args) == 0
    assert run(folders, "class", tmp_path / "b", *args) == 0
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.png"))
    # one sub-folder per class (classes cycle 1, 3, 1), the layout `rqvae eval --accuracy` reads
    assert files == ["grid.png", "images/1/000000.png", "images/1/000002.png", "images/3/000001.png"]
    assert Image.open(tmp_path / "a" / "images" / "1" / "000000.png").size == (16, 16)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "images/s" in capsys.readouterr().out
    assert run(folders, "class", tmp_path / "c", *args[:-1], "8") == 0
    assert (tmp_path / "c" / "grid.png").read_bytes() != (tmp_path / "a" / "grid.png").read_bytes()


def test_impl_reference_draws_the_fast_samplers_images(folders, tmp_path):
    args = ("--class", "2", "--n", "3", "--dtype", "fp32", "--seed", "3")
    assert run(folders, "class", tmp_path / "f", *args, "--impl", "fast") == 0
    assert run(folders, "class", tmp_path / "r", *args, "--impl", "reference") == 0
    assert (tmp_path / "f" / "grid.png").read_bytes() == (tmp_path / "r" / "grid.png").read_bytes()


def test_text_and_uncond_models(folders, tmp_path):
    assert run(folders, "text", tmp_path / "t", "--text", "a red dress", "--n", "2") == 0
    assert len(list((tmp_path / "t" / "images").glob("*.png"))) == 2
    assert run(folders, "uncond", tmp_path / "u", "--n", "2", "--temperature", "0.8") == 0


@pytest.mark.parametrize("model,extra,message", [
    ("class", ("--class", "10"), "out of range"),
    ("class", ("--text", "hi"), "class-conditional"),
    ("class", (), "--class ID"),
    ("text", ("--class", "1"), "--text"),
    ("uncond", ("--class", "1"), "unconditional"),
    ("uncond", ("--cfg-scale", "2"), "null condition"),
    ("class", ("--class", "1", "--top-k", "1,2"), "code depths"),
    ("class", ("--class", "1", "--top-k", "x"), "--top-k"),
    ("class", ("--class", "1", "--impl", "graphs"), "CUDA"),
])
def test_user_errors(folders, tmp_path, capsys, model, extra, message):
    assert run(folders, model, tmp_path / "e", "--n", "1", *extra) == 2
    assert message in capsys.readouterr().err


def test_mismatched_vae_is_refused(folders, tmp_path, capsys):
    code = main(["sample", "--model", str(folders / "class"), "--vae", str(folders / "other_vae"),
                 "-o", str(tmp_path), "--class", "1", "--n", "1"])
    assert code == 2 and "codebook differs" in capsys.readouterr().err


def test_class_samples_feed_eval_accuracy(folders, tmp_path, capsys):
    """`rqvae sample` writes the layout that `rqvae eval --accuracy` reads (a sub-folder per class)."""
    import json

    from rqvae.data.images import load_images
    from tests.helpers.classifier_fixtures import classifier_choosing

    assert run(folders, "class", tmp_path / "s", "--class", "0", "1", "2", "--n", "6") == 0
    pngs = sorted((tmp_path / "s" / "images").rglob("*.png"))
    labels = torch.tensor([int(p.parent.name) for p in pngs])  # the class each sample was drawn for
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    chosen = labels.clone()
    chosen[0] = 9  # a classifier that agrees with the requested class on 5 of the 6 samples
    classifier_choosing(load_images(pngs, 3, 16), chosen, 10).save_pretrained(tmp_path / "clf")
    capsys.readouterr()
    assert main(["eval", "--accuracy", str(tmp_path / "s" / "images"), "--classifier", str(tmp_path / "clf"),
                 "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["classifier"]
    assert res["num_samples"] == 6 and res["accuracy"] == pytest.approx(5 / 6, abs=1e-6)
