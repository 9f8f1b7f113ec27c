"""What a new user hit (issue 13): class names in `rqvae sample` and its folders, run folders given where a
model folder is expected, labelled figures, the split `eval --recon` really used, `--resize-mode pad`, and
the one-line CFG error before any sampling."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.cli import main
from rqvae.data import build_image_dataset
from rqvae.data.images import load_image, load_images, make_grid
from rqvae.errors import UserError
from rqvae.eval.classes import class_folder, folder_class_ids, parse_class
from rqvae.eval.figures import label_grid, labelled_coarse_to_fine
from rqvae.eval.pairing import check_pair
from rqvae.models.hub import resolve_model_dir, weights_sha256
from rqvae.models.transformer import AR_PRESETS, RQTransformer
from rqvae.models.vae import RQVAE

NAMES = ("apple", "T-shirt/top", "fruit")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """root/vae_run/model (a finished train-vae run), root/ar_run/model (class names, CFG) and
    root/plain_ar (no class names, no condition dropout), root/images (6 clip-art-like PNGs)."""
    root = tmp_path_factory.mktemp("issue13")
    torch.manual_seed(0)
    vae = RQVAE.from_preset("tiny")  # 32 px -> 8x8x4 codes, K 64, n_z 16
    vae.save_pretrained(root / "vae_run" / "model")
    (root / "vae_run" / "checkpoints").mkdir()
    (root / "vae_run" / "samples").mkdir()
    cb = vae.quantizer.codebook[0]
    cfg = replace(AR_PRESETS["tiny"], code_shape=(8, 8, 4), vocab_size=64, embed_dim=16, num_classes=3)
    RQTransformer(replace(cfg, class_names=NAMES, cfg_dropout=0.1), codebook=cb).save_pretrained(
        root / "ar_run" / "model")
    RQTransformer(cfg, codebook=cb).save_pretrained(root / "plain_ar")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(6):
        img = np.full((40, 24, 3), 255, np.uint8)  # taller than wide, like the clip art
        img[8:32, 4:20] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line
    return err


# ---------------------------------------------------------------------------------------- 1. class names
def test_sample_by_class_name_writes_name_folders_and_prints_the_table(runs, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(runs / "ar_run"), "--vae", str(runs / "vae_run"), "-o", str(out),
                 "--class", "fruit", "0", "t-shirt/top", "--n", "4", "--device", "cpu"]) == 0
    files = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert files == ["T-shirt_top/000002.png", "apple/000001.png", "fruit/000000.png", "fruit/000003.png"]
    text = capsys.readouterr().out
    assert "class 2 (fruit): 2 images" in text and "class 1 (T-shirt/top): 1 images" in text


def test_sample_without_names_keeps_id_folders(runs, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(runs / "plain_ar"), "--vae", str(runs / "vae_run"), "-o", str(out),
                 "--class", "2", "--n", "1"]) == 0
    assert [p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png")] == \
        ["2/000000.png"]


@pytest.mark.parametrize("model,value,message", [
    ("ar_run/model", "banana", "0 = apple, 1 = T-shirt/top, 2 = fruit"),
    ("ar_run/model", "3", "out of range"),
    ("plain_ar", "apple", "has no class names"),
])
def test_unknown_class_is_a_one_line_error(runs, tmp_path, capsys, model, value, message):
    assert main(["sample", "--model", str(runs / model), "--vae", str(runs / "vae_run"), "-o",
                 str(tmp_path / "e"), "--class", value, "--n", "1"]) == 2
    assert message in _err(capsys)


def test_class_helpers():
    assert parse_class("fruit", 3, NAMES) == 2 and parse_class("APPLE", 3, NAMES) == 0
    assert parse_class("T-shirt_top", 3, NAMES) == 1 and parse_class("1", 3, NAMES) == 1
    assert class_folder("T-shirt/top") == "T-shirt_top" and class_folder("../x") == "x"
    assert folder_class_ids(["fruit", "T-shirt_top", "0"], 3, NAMES, "d") == [2, 1, 0]
    with pytest.raises(UserError, match="neither a class id"):
        folder_class_ids(["pear"], 3, NAMES, "d")


def test_eval_accuracy_reads_class_name_folders(runs, tmp_path, capsys):
    from tests.helpers.classifier_fixtures import classifier_choosing

    out = tmp_path / "s"
    assert main(["sample", "--model", str(runs / "ar_run"), "--vae", str(runs / "vae_run"), "-o", str(out),
                 "--class", "apple", "T-shirt/top", "fruit", "--n", "6"]) == 0
    pngs = sorted((out / "images").rglob("*.png"))
    labels = torch.tensor([NAMES.index({"T-shirt_top": "T-shirt/top"}.get(p.parent.name, p.parent.name))
                           for p in pngs])
    chosen = labels.clone()
    chosen[0] = (chosen[0] + 1) % 3  # the classifier agrees with the requested class on 5 of the 6
    clf = classifier_choosing(load_images(pngs, 3, 32), chosen, 3, NAMES)
    clf.save_pretrained(tmp_path / "clf_run" / "model")  # a run folder: eval --classifier takes it
    assert main(["eval", "--accuracy", str(out / "images"), "--classifier", str(tmp_path / "clf_run"),
                 "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["classifier"]
    assert res["num_samples"] == 6 and res["accuracy"] == pytest.approx(5 / 6, abs=1e-6)


def test_serve_class_picker_uses_the_config_names(runs):
    from rqvae.serve.models import load_models

    models = load_models([runs / "vae_run", runs / "ar_run"], device="cpu")
    assert models.class_names == list(NAMES) and models.vae_dir == runs / "vae_run" / "model"


# ---------------------------------------------------------------------------------------- 2. run folders
def test_run_folders_are_accepted_everywhere(runs, tmp_path, capsys):
    vae, ar, imgs = str(runs / "vae_run"), str(runs / "ar_run"), str(runs / "images")
    assert resolve_model_dir(vae) == runs / "vae_run" / "model"
    assert weights_sha256(vae) == weights_sha256(runs / "vae_run" / "model")
    codes = str(tmp_path / "c.safetensors")
    assert main(["encode", imgs, "--model", vae, "-o", codes]) == 0
    assert main(["decode", codes, "--model", vae, "-o", str(tmp_path / "dec")]) == 0
    assert "warning" not in capsys.readouterr().err  # the same weights, found through the run
    assert main(["reconstruct", imgs, "--model", vae, "-o", str(tmp_path / "fig.png")]) == 0
    rqv, dec = str(tmp_path / "rqv"), str(tmp_path / "d")
    assert main(["compress", imgs, "--vae", vae, "--prior", ar, "--class", "1", "-o", rqv]) == 0
    assert main(["decompress", rqv, "--vae", vae, "--prior", ar, "-o", dec]) == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 6
    assert main(["codebook", vae, "--data", imgs, "--count", "6"]) == 0
    assert main(["eval", "--recon", "--model", vae, "--data", imgs, "--no-progress"]) == 0
    assert main(["info", ar]) == 0
    assert "0 = apple, 1 = T-shirt/top, 2 = fruit" in capsys.readouterr().out


@pytest.mark.parametrize("where,message", [
    ("vae_run/samples", "did you mean"),
    ("unfinished", "has not finished"),
    ("nowhere", "does not exist"),
])
def test_not_a_model_folder_says_what_to_pass(runs, tmp_path, capsys, where, message):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    path = runs / where if where.startswith("vae_run") else tmp_path / where
    assert main(["encode", str(runs / "images"), "--model", str(path), "-o", str(tmp_path / "c.st")]) == 2
    err = _err(capsys)
    assert message in err and "not a model folder" in err
    if where == "vae_run/samples":
        assert str(runs / "vae_run" / "model") in err


def test_check_pair_is_one_function_for_sample_and_codec(runs):
    vae = RQVAE.from_pretrained(runs / "vae_run")
    ar = RQTransformer.from_pretrained(runs / "ar_run")
    check_pair(vae, ar, code_shape=vae.code_shape())
    check_pair(vae, None)
    with pytest.raises(UserError, match="codes of shape"):
        check_pair(vae, ar, code_shape=(4, 4, 4))
    other = RQVAE.from_preset("tiny")
    with pytest.raises(UserError, match="codebook differs"):
        check_pair(other, ar)


# ---------------------------------------------------------------------------------------- 3. labels
def _dark_rows(img: np.ndarray) -> set[int]:
    return {int(r) for r in np.nonzero((img < 100).any(axis=1))[0]}


def test_label_grid_draws_a_header_and_row_labels():
    white = torch.ones(6, 1, 16, 16)  # white cells: any dark pixel is text
    grid = make_grid(white, nrow=3)  # 2 rows x 3 columns
    out = label_grid(grid, ["input", "d=1", "d=2"], ["cat", "dog"])
    a = ((out[0] + 1) * 127.5).numpy()
    scale = 2  # "input" is wider than a 16 px cell: the grid is enlarged
    top = out.shape[1] - grid.shape[1] * scale
    left = out.shape[2] - grid.shape[2] * scale
    assert top > 8 and left > 8
    assert _dark_rows(a[:top]), "the header rows are blank"
    assert not _dark_rows(a[top:, left:]), "text was drawn over the images"
    rows = _dark_rows(a[:, :left].copy())
    half = top + (out.shape[1] - top) // 2
    assert any(r < half for r in rows) and any(r >= half for r in rows)  # a label beside each row
    assert label_grid(grid) is grid


def test_reconstruct_writes_a_labelled_figure(runs, tmp_path):
    imgs = str(runs / "images")
    assert main(["reconstruct", imgs, "--model", str(runs / "vae_run"), "-o", str(tmp_path / "a.png"),
                 "--max-images", "2"]) == 0
    assert main(["reconstruct", imgs, "--model", str(runs / "vae_run"), "-o", str(tmp_path / "b.png"),
                 "--max-images", "2", "--no-labels"]) == 0
    a = np.asarray(Image.open(tmp_path / "a.png").convert("L"))
    b = np.asarray(Image.open(tmp_path / "b.png").convert("L"))
    top, left = a.shape[0] - b.shape[0], a.shape[1] - b.shape[1]
    assert top > 8 and left > 8 and _dark_rows(a[:top])
    assert np.array_equal(a[top:, left:], b)  # the same images below the header, right of the labels


def test_labelled_coarse_to_fine_rows_when_not_transposed():
    x = torch.ones(2, 1, 32, 32)
    fig = labelled_coarse_to_fine(x, [x, x], [1, 2])  # rows: input, d=1, d=2; no column labels
    assert fig.shape[1] == 3 * 34 + 2 and fig.shape[2] > 2 * 34 + 2


# ---------------------------------------------------------------------------------------- 4. split used
def test_eval_recon_reports_the_split_actually_used(runs, tmp_path, capsys):
    vae = str(runs / "vae_run")
    assert main(["eval", "--recon", "--model", vae, "--data", str(runs / "images"), "--json",
                 str(tmp_path / "a.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["tokenizer"]["split"] == \
        f"all images of {runs / 'images'}"
    assert f"all images of {runs / 'images'}" in capsys.readouterr().out
    split = tmp_path / "split"
    for name in ("train", "test"):
        (split / name).mkdir(parents=True)
        for f in sorted((runs / "images").glob("*.png"))[:2]:
            (split / name / f.name).write_bytes(f.read_bytes())
    assert main(["eval", "--recon", "--model", vae, "--data", str(split), "--json", str(tmp_path / "b.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["tokenizer"]["split"] == "test"


# ---------------------------------------------------------------------------------------- 5. resize mode
def _tall(path: Path) -> Path:
    img = np.full((96, 32, 3), 128, np.uint8)
    img[:8] = (255, 0, 0)  # red top
    img[-8:] = (0, 0, 255)  # blue bottom
    Image.fromarray(img).save(path)
    return path


def test_pad_keeps_the_whole_tall_image(tmp_path):
    f = _tall(tmp_path / "tall.png")
    pad = load_image(f, 32, 3, resize_mode="pad")  # (3, 32, 32): the image is 11 px wide, edges repeated
    crop = load_image(f, 32, 3)
    assert pad[0, 0, 16] > 0.9 and pad[2, 0, 16] < -0.9  # red survives at the top
    assert pad[2, -1, 16] > 0.9 and pad[0, -1, 16] < -0.9  # blue survives at the bottom
    assert torch.allclose(pad[:, :, 0], pad[:, :, 10])  # letterboxed with the edge pixels, no black bars
    assert abs(float(crop[0, 0, 16])) < 0.1 and abs(float(crop[2, -1, 16])) < 0.1  # crop: grey, cut off
    ds = build_image_dataset(str(tmp_path), 32, 3, resize_mode="pad")
    assert torch.equal(ds[0]["image"], pad)
    with pytest.raises(UserError, match="resize mode"):
        load_image(f, 32, 3, resize_mode="stretch")


def test_resize_mode_option_and_help(runs, tmp_path, capsys):
    f = str(_tall(tmp_path / "tall.png"))
    vae = str(runs / "vae_run")
    for mode in ("crop", "pad"):
        out = str(tmp_path / f"{mode}.st")
        assert main(["encode", f, "--model", vae, "-o", out, "--resize-mode", mode]) == 0
    assert (tmp_path / "crop.st").read_bytes() != (tmp_path / "pad.st").read_bytes()
    for command in ("encode", "reconstruct", "compress", "codebook", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--resize-mode {crop,pad}" in text and "centre-crops the long one" in text, command


# ---------------------------------------------------------------------------------------- 6. CFG
def test_cfg_without_condition_dropout_fails_before_sampling(runs, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["sample", "--model", str(runs / "plain_ar"), "--vae", str(runs / "vae_run"), "-o", str(out),
                 "--class", "1", "--cfg-scale", "2"]) == 2
    assert "--cond-dropout 0.1" in _err(capsys)
    assert not out.exists()  # nothing was sampled or written
