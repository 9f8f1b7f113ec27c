import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rqvae.cli import main
from rqvae.data.images import load_images, make_grid
from rqvae.models.vae import RQVAE

SIZE = 16  # tiny model: 16x16 RGB -> 8x8x2 codes, K = 16
CFG = dict(image_size=SIZE, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
           z_channels=8, embed_dim=8, codebook_size=16, depth=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    RQVAE.from_preset("tiny", **CFG).save_pretrained(root / "model")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels(20, 24, 3)).save(imgs / "a.png")  # non-square RGB
    Image.fromarray(pixels(16, 16)).save(imgs / "b.png")  # grayscale
    Image.fromarray(pixels(16, 16, 4)).save(imgs / "sub" / "c.png")  # RGBA
    (imgs / "notes.txt").write_text("not an image")  # skipped by folder expansion
    return root


def run_ok(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def run_err(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and ": error: " in err, err
    return err


def test_encode_decode_roundtrip(setup, tmp_path, capsys):
    model_dir, imgs = setup / "model", setup / "imgs"
    codes_file = tmp_path / "codes.safetensors"
    run_ok(["encode", imgs, "--model", model_dir, "-o", codes_file, "--batch-size", "2"], capsys)
    codes = load_file(str(codes_file))["codes"]
    assert codes.shape == (3, 8, 8, 2) and codes.dtype == torch.int64
    with safe_open(str(codes_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["codebook_size"] == "16" and json.loads(meta["code_shape"]) == [8, 8, 2]
    assert json.loads(meta["sources"]) == ["a.png", "b.png", "sub/c.png"]
    assert len(meta["model_sha256"]) == 64
    assert not any(str(setup) in v or str(Path.cwd()) in v for v in meta.values())  # no absolute paths
    sources = [imgs / s for s in json.loads(meta["sources"])]

    # the same codes as the library gives for the same preprocessed images
    model = RQVAE.from_pretrained(model_dir).eval()
    x = load_images(sources, 3, SIZE)
    assert torch.equal(codes, model.encode(x))

    out = tmp_path / "dec"
    run_ok(["decode", codes_file, "--model", model_dir, "-o", out], capsys)
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000_a.png", "00001_b.png", "00002_c.png"]
    png = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files])
    expect = ((model.decode(codes).clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert png.shape == (3, SIZE, SIZE, 3)
    assert (png.float() - expect).abs().max() <= 1  # PNG quantization only

    out1 = tmp_path / "dec1"
    run_ok(["decode", codes_file, "--model", model_dir, "-o", out1, "--depth", "1"], capsys)
    d1 = np.asarray(Image.open(out1 / "00000_a.png")).astype(np.float32)
    expect1 = ((model.decode(codes, depth=1)[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(d1 - expect1).max() <= 1
    assert np.abs(d1 - np.asarray(Image.open(files[0])).astype(np.float32)).max() > 1  # depth matters


def test_reconstruct_grid(setup, tmp_path, capsys):
    fig = tmp_path / "fig.png"
    text = run_ok(["reconstruct", setup / "imgs", "--model", setup / "model", "--depths", "1,2", "-o", fig,
                   "--no-labels"], capsys)
    assert "depth 1: PSNR" in text and "depth 2: PSNR" in text
    # 3 rows x (original + 2 depths), 16 px cells and 2 px padding
    assert Image.open(fig).size == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    labelled = tmp_path / "labelled.png"
    run_ok(["reconstruct", setup / "imgs", "--model", setup / "model", "--depths", "1,2", "-o", labelled],
           capsys)
    w, h = Image.open(labelled).size  # + a header row and file names (cells enlarged 2x for "input")
    assert w > 2 * (3 * (SIZE + 2) + 2) and h > 2 * (3 * (SIZE + 2) + 2)
    grid = np.asarray(Image.open(fig).convert("RGB")).astype(np.float32)
    original = (load_images([setup / "imgs" / "a.png"], 3, SIZE)[0] + 1) * 127.5
    assert np.abs(grid[2:2 + SIZE, 2:2 + SIZE] - original.permute(1, 2, 0).numpy()).max() <= 1


def test_make_grid_layout():
    imgs = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    g = make_grid(imgs, nrow=2, padding=1, pad_value=-1)
    assert g.shape == (1, 3 * 3 + 1, 2 * 3 + 1)
    assert g[0, 1, 1] == 0 and g[0, 1, 4] == 1 and g[0, 4, 1] == 2 and g[0, 7, 1] == 4 and g[0, 7, 4] == -1


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    model_dir = setup / "model"
    err = run_err(["encode", tmp_path / "missing.png", "--model", model_dir, "-o", tmp_path / "c.st"], capsys)
    assert "does not exist" in err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    err = run_err(["encode", junk, "--model", model_dir, "-o", tmp_path / "c.st"], capsys)
    assert "is not a readable image" in err
    err = run_err(["encode", junk, "--model", tmp_path, "-o", tmp_path / "c.st"], capsys)
    assert "config.json is missing" in err

    # codes outside the codebook, codes of another shape, files that are not codes
    bad = tmp_path / "bad.safetensors"
    dec = ["decode", bad, "--model", model_dir, "-o", tmp_path]
    save_file({"codes": torch.full((1, 8, 8, 2), 16, dtype=torch.int64)}, str(bad))
    assert "outside the model's codebook" in run_err(dec, capsys)
    save_file({"codes": torch.zeros((1, 8, 8, 3), dtype=torch.int64)}, str(bad))
    assert "depth 3" in run_err(dec, capsys)
    save_file({"codes": torch.zeros((1, 4, 4, 2), dtype=torch.int64)}, str(bad))
    assert "code maps of (4, 4)" in run_err(dec, capsys)
    zeros = torch.zeros((1, 8, 8, 2), dtype=torch.int64)
    save_file({"codes": zeros}, str(bad), metadata={"codebook_size": "64"})
    assert "codebook of 64 codes" in run_err(dec, capsys)
    assert "not a safetensors" in run_err(["decode", junk, "--model", model_dir, "-o", tmp_path], capsys)
    rec = ["reconstruct", setup / "imgs", "--model", model_dir, "-o", tmp_path / "f.png"]
    err = run_err([*rec, "--depths", "1,5"], capsys)
    assert "--depths must be in 1..2" in err


def test_decode_warns_on_other_weights(setup, tmp_path, capsys):
    codes_file = tmp_path / "codes.safetensors"
    run_ok(["encode", setup / "imgs" / "a.png", "--model", setup / "model", "-o", codes_file], capsys)
    torch.manual_seed(1)
    RQVAE.from_preset("tiny", **CFG).save_pretrained(tmp_path / "other")
    code = main(["decode", str(codes_file), "--model", str(tmp_path / "other"), "-o", str(tmp_path / "o")])
    assert code == 0 and "warning: " in capsys.readouterr().err
