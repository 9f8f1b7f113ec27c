"""The demo pipeline end to end on a few hundred tiny images (tiny models, few steps)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.demo.pipeline import DemoConfig, run_demo
from rqvae.demo.stages import generate_images
from rqvae.models.classifier import Classifier, classifier_accuracy
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE


def _image_folder(root, n_per_class=40, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            img = np.zeros((32, 32), np.uint8)
            x0 = 4 + 8 * c
            img[6:26, x0:x0 + 8] = 200 + rng.integers(0, 40)  # a bar whose place tells the class
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _tiny_config(out, data, **kw):
    return DemoConfig(
        out=str(out), data=str(data), image_size=32, channels=1,
        vae_preset="tiny", vae_steps=6, vae_batch_size=16,
        ar_preset="tiny", ar_model=dict(cfg_dropout=0.1), ar_steps=6, ar_batch_size=16,  # a null class: CFG
        classifier_steps=10, classifier_width=8,
        classifier_batch_size=16,
        samples_per_class=2, eval_samples=12, fid_ref_count=24, fig5_images=3, progress=False, **kw,
    )


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    cfg = _tiny_config(tmp_path / "demo", data)
    results = run_demo(cfg)
    out = tmp_path / "demo"
    for name in ("report.html", "report.json", "samples_per_class.png", "coarse_to_fine.png",
                 "loss_curves.png", "vae/model/model.safetensors", "ar/model/model.safetensors",
                 "classifier/model.safetensors"):
        assert (out / name).is_file(), name
    m = results["metrics"]
    fid_key = next(k for k in m if k.startswith("FID ("))
    floor_key = next(k for k in m if k.startswith("FID floor"))
    # six training steps: the samples are far from the data, much further than real images of it
    assert np.isfinite(m[fid_key]) and m[fid_key] > 10 and m[fid_key] > 2 * m[floor_key]
    assert m["FID - floor"] == pytest.approx(m[fid_key] - m[floor_key])
    assert "12 samples vs 24 test images" in fid_key and "24 train vs 24 test" in floor_key
    assert np.isfinite(next(v for k, v in m.items() if k.startswith("rFID")))
    # the reported accuracy is the saved classifier's on the saved models' samples, drawn again
    vae = RQVAE.from_pretrained(out / "vae" / "model").eval()
    ar = RQTransformer.from_pretrained(out / "ar" / "model").eval()
    clf = Classifier.from_pretrained(out / "classifier").eval()
    labels = torch.arange(cfg.eval_samples) % 3
    samples = generate_images(ar, vae, labels, cfg)
    assert m["classifier accuracy on generated images"] == pytest.approx(
        classifier_accuracy(samples, labels, clf), abs=1e-9)
    assert len(results["psnr_per_depth"]) == 4
    # the sample grid has one row per class (3 rows of 32 px cells, 2 px padding), its name on the left
    grid = Image.open(out / "samples_per_class.png")
    assert grid.size[1] == 3 * (32 + 2) + 2 and grid.size[0] > 2 * (32 + 2) + 2  # 3 rows x 2 columns + labels
    assert np.asarray(grid.convert("L"))[:, :grid.size[0] - (2 * 34 + 2)].min() < 100  # dark label text
    assert "samples_per_class.png" in (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text())["metrics"][fid_key] == pytest.approx(m[fid_key])

    # a second run reuses every trained model
    capsys.readouterr()
    run_demo(cfg)
    text = capsys.readouterr().out
    assert "reusing the RQ-VAE" in text and "reusing the RQ-Transformer" in text
    assert "reusing the classifier" in text


@pytest.mark.slow
def test_side_process_gives_the_sequential_results(tmp_path):
    """With two threads the classifier and the real images' FID statistics are computed in a second
    process (one thread each); the report is the one the same run in order gives."""
    data = _image_folder(tmp_path / "data")
    seq = run_demo(_tiny_config(tmp_path / "seq", data, parallel=False))["metrics"]
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        par = run_demo(_tiny_config(tmp_path / "par", data))["metrics"]
        assert torch.get_num_threads() == 2  # the main process has its threads back
    finally:
        torch.set_num_threads(n)
    assert "time: classifier (side process) (s)" in par and "time: classifier (s)" not in par
    assert "time: real images' FID statistics (side process) (s)" in par
    assert "time: classifier (s)" in seq and not any("side process" in k for k in seq)
    for key, value in seq.items():
        if key.startswith("time:"):
            continue
        # the models train on one thread either way; Inception may sum in another order
        assert par[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    assert (tmp_path / "par" / "classifier" / "model.safetensors").is_file()
