"""``rqvae info`` and ``rqvae codebook`` on our folders, training runs and the official fixtures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.eval.codebook import codebook_report
from rqvae.models.vae import RQVAE
from tests.helpers.paths import OFFICIAL


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    vae = RQVAE.from_preset("tiny")
    run = tmp_path / "run"
    vae.save_pretrained(run / "model")
    (run / "train_config.json").write_text(json.dumps({"data": "imgs/", "steps": 30, "preset": "tiny"}))
    rows = [{"step": 10, "loss/rec": 0.5}, {"step": 20, "loss/rec": 0.25, "val/psnr_d4": 18.5},
            {"step": 30, "loss/rec": 0.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    return run, vae


def test_info_json_on_a_run_folder(run_dir, capsys):
    run, vae = run_dir
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "rqvae" and info["path"] == str(run / "model")
    assert info["parameters"] == sum(t.numel() for t in vae.state_dict().values())
    assert info["code_shape"] == list(vae.code_shape()) and info["codebook_size"] == 64
    assert info["run"]["steps"] == 30 and info["run"]["data"] == "imgs/"
    assert info["run"]["validation"] == {"val/psnr_d4": {"value": 18.5, "step": 20}}
    assert info["run"]["training"]["loss/rec"] == {"value": 0.2, "step": 30}


def test_info_on_official_checkpoints(capsys):
    assert main(["info", str(OFFICIAL / "rqvae_tiny"), str(OFFICIAL / "rqtransformer_class_tiny"),
                 "--json"]) == 0
    vae_info, ar_info = json.loads(capsys.readouterr().out)
    assert vae_info["stage"].startswith("stage 1") and vae_info["code_shape"] == [8, 8, 4]
    assert vae_info["codebook_size"] == 64
    # the shared codebook is stored once per depth in the official file, and counted once
    state = torch.load(OFFICIAL / "rqvae_tiny" / "model.pt", weights_only=True)["state_dict"]
    want = sum(v.numel() for k, v in state.items()
               if not (k.startswith("quantizer.codebooks.") and not k.startswith("quantizer.codebooks.0.")))
    assert vae_info["parameters"] == want
    assert ar_info["stage"].startswith("stage 2") and ar_info["condition"] == "class"


def test_info_on_a_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["info", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "has not finished" in err and len(err.strip().splitlines()) == 1


def test_codebook_report_matches_a_direct_computation(run_dir):
    _, vae = run_dir
    vae.eval()
    torch.manual_seed(1)
    images = torch.rand(24, 3, 32, 32) * 2 - 1
    report = codebook_report(vae, TensorImageDataset(images), count=None, batch_size=10,
                             temperatures=[1e-9, 0.3])
    with torch.no_grad():
        z = vae.encode_latent(images).reshape(-1, 16)
        codes = vae.quantizer.encode(z)
        probs, _ = vae.quantizer.soft_codes(z, 0.3)  # (N, D, K): entropy over all vectors, by hand
        entropy = -(probs * probs.clamp_min(1e-30).log2()).sum(-1).mean(0)
    sharp, mid = report["soft_labels"]
    assert sharp["temperature"] == 1e-9 and sharp["greedy_share"] == [1.0] * 4
    assert mid["entropy_bits"][0] == pytest.approx(float(entropy[0]), rel=1e-4)  # depth 1: no draws before it
    with torch.no_grad():
        for d in (1, 4):
            want = (z - vae.quantizer.decode(codes[:, :d])).norm(dim=1).mean() / z.norm(dim=1).mean()
            assert report["per_depth"][d - 1]["residual_norm"] == pytest.approx(float(want), rel=1e-5)
    for d, row in enumerate(report["per_depth"]):
        used = len(set(codes[:, d].tolist()))
        assert row["used"] == used and row["dead"] == 64 - used
    assert report["vectors"] == 24 * 64


def test_codebook_cli_writes_table_and_figure(run_dir, tmp_path, capsys):
    run, _ = run_dir
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    args = ["codebook", str(run), "--data", str(imgs), "--split", "train", "-o", str(tmp_path / "cb"),
            "--soft-labels", "0.5", "0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "temperature 0.5:" in out and "temperature 0.01:" in out
    assert (tmp_path / "cb" / "codebook.png").stat().st_size > 1000
    report = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert report["vectors"] == 6 * 64 and len(report["per_depth"]) == 4
