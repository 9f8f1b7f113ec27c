"""Issue 6, bad arguments: every mistake a user can make gives one line naming the problem (exit code 2
from the CLI, UserError from the library), never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rqvae.cli import main
from rqvae.errors import UserError
from rqvae.models.vae import RQVAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae")
    RQVAE.from_preset("tiny").save_pretrained(d)
    return d


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_paths(capsys, tmp_path, vae_dir):
    _one_line_error(capsys, ["decode", str(tmp_path / "nope.safetensors"), "--model", str(vae_dir),
                             "-o", str(tmp_path / "out")], "nope.safetensors")
    _one_line_error(capsys, ["encode", str(tmp_path / "missing.png"), "--model", str(vae_dir),
                             "-o", str(tmp_path / "c.safetensors")], "missing.png")
    _one_line_error(capsys, ["sample", "--model", str(tmp_path / "no-model"), "--vae", str(vae_dir),
                             "-o", str(tmp_path / "s")], "no-model")
    _one_line_error(capsys, ["train-vae", "--data", str(tmp_path / "no-data"), "--preset", "tiny",
                             "--out", str(tmp_path / "run")], "no-data")
    _one_line_error(capsys, ["train-ar", "--vae", str(tmp_path / "no-vae"), "--data", str(tmp_path),
                             "--out", str(tmp_path / "run2")], "no-vae")


def test_missing_weights_and_mismatched_config(capsys, tmp_path, vae_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((vae_dir / "config.json").read_text())
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    _one_line_error(capsys, ["encode", str(tmp_path / "x.png"), "--model", str(broken), "-o",
                             str(tmp_path / "c.safetensors")], "model.safetensors")
    cfg = json.loads((vae_dir / "config.json").read_text())
    cfg["codebook_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "model.safetensors").write_bytes((vae_dir / "model.safetensors").read_bytes())
    _one_line_error(capsys, ["encode", str(tmp_path / "x.png"), "--model", str(broken), "-o",
                             str(tmp_path / "c.safetensors")], "does not match its config")


def test_codes_out_of_range_or_wrong_depth(capsys, tmp_path, vae_dir):
    vae = RQVAE.from_pretrained(vae_dir)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "x.png")
    assert main(["encode", str(tmp_path / "x.png"), "--model", str(vae_dir), "-o",
                 str(tmp_path / "c.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, key = f.metadata(), list(f.keys())[0]
        codes = f.get_tensor(key)
    bad = codes.clone()
    bad[..., 0] = vae.config.codebook_size  # outside [0, K)
    save_file({key: bad}, str(tmp_path / "bad.safetensors"), metadata=meta)
    _one_line_error(capsys, ["decode", str(tmp_path / "bad.safetensors"), "--model", str(vae_dir), "-o",
                             str(tmp_path / "o")])
    save_file({key: codes[..., :2].contiguous()}, str(tmp_path / "shallow.safetensors"), metadata=meta)
    _one_line_error(capsys, ["decode", str(tmp_path / "shallow.safetensors"), "--model", str(vae_dir),
                             "-o", str(tmp_path / "o2")])
    _one_line_error(capsys, ["decode", str(tmp_path / "c.safetensors"), "--model", str(vae_dir),
                             "--depth", "9", "-o", str(tmp_path / "o3")])


def test_library_errors_name_the_problem(vae_dir):
    vae = RQVAE.from_pretrained(vae_dir)
    with pytest.raises(UserError, match="RGB images"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(UserError):
        vae.encode(torch.zeros(1, 3, 30, 30))  # not divisible by the downsampling factor
    codes = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    with pytest.raises(UserError):
        vae.decode(codes + vae.config.codebook_size)
    with pytest.raises(UserError):
        vae.decode(torch.zeros(1, 8, 8, 5, dtype=torch.long))
    with pytest.raises(UserError):
        vae.quantizer.encode(torch.zeros(4, vae.config.embed_dim + 1))
