"""Metrics: FID with the local FID InceptionV3, cached reference statistics, IS, tokenizer evaluation, CLI.

Images are made here (smooth random colour fields at 32x32); the network runs at 299x299 on CPU at
~0.15 s per image, so each set is small."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rqvae.cli import main
from rqvae.data.images import load_images
from rqvae.errors import UserError
from rqvae.eval.fid import FeatureStats, compute_stats, frechet_distance, reference_stats
from rqvae.eval.inception import InceptionFeatures, to_uint8_range
from rqvae.eval.is_score import ClassifierLogits, inception_score
from rqvae.eval.tokenizer import evaluate_tokenizer
from rqvae.models.classifier import Classifier, ClassifierConfig
from tests.helpers.classifier_fixtures import classifier_choosing


def smooth_images(n: int, seed: int, size: int = 32, channels: int = 3) -> torch.Tensor:
    """(n, C, size, size) in [-1, 1]: 4x4 random fields upsampled bilinearly (structured, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def write_pngs(folder, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        arr = to_uint8_range(x).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def net() -> InceptionFeatures:
    return InceptionFeatures(batch_size=32)


def test_default_network_file_and_features(net):
    assert net.path.name == "default_1.pt" and net.path.is_file()
    x = smooth_images(2, seed=0)
    f = net(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    # grayscale is repeated to 3 channels: same features as the RGB image with equal channels
    g = smooth_images(1, seed=1, channels=1)
    assert torch.allclose(net(g), net(g.expand(-1, 3, -1, -1)), atol=1e-5)


@pytest.mark.slow  # FID's eigvals of a 2048x2048 product take ~20 s on one CPU core
def test_fid_self_is_zero_and_grows_with_noise(net):
    x = smooth_images(10, seed=0)
    ref = compute_stats([x], net)
    assert ref.count == 10 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    fids = []
    for sigma in (0.0, 0.15, 0.5):
        value, stats = frechet_distance([(x + sigma * noise).clamp(-1, 1)], ref, net)
        assert stats.count == 10 and math.isfinite(value)
        fids.append(value)
    assert abs(fids[0]) < 1e-2 * fids[1], fids  # numerical noise only
    assert fids[0] < fids[1] < fids[2], fids


def test_reference_stats_are_cached_and_reused(net, tmp_path):
    folder = tmp_path / "ref"
    write_pngs(folder, smooth_images(8, seed=3))
    cache = tmp_path / "cache"
    before = net.images_seen
    s1, path1, cached1 = reference_stats(str(folder), net, 32, cache_dir=cache, batch_size=8)
    assert not cached1 and path1.is_file() and path1.parent == cache
    assert net.images_seen == before + 8
    s2, path2, cached2 = reference_stats(str(folder), net, 32, cache_dir=cache, batch_size=8)
    assert cached2 and path2 == path1
    assert net.images_seen == before + 8  # the network did not run again
    assert torch.equal(s1.mu, s2.mu) and torch.equal(s1.sigma, s2.sigma) and s2.count == 8
    # another count is another key
    _, path3, cached3 = reference_stats(str(folder), net, 32, count=3, cache_dir=cache, batch_size=8)
    assert not cached3 and path3 != path1 and net.images_seen == before + 11
    # a changed dataset gets new statistics
    write_pngs(tmp_path / "ref_more", smooth_images(1, seed=9))
    (tmp_path / "ref_more" / "000.png").rename(folder / "extra.png")
    _, path4, cached4 = reference_stats(str(folder), net, 32, cache_dir=cache, batch_size=9)
    assert not cached4 and path4 != path1


def test_stats_file_round_trip_and_errors(net, tmp_path):
    stats = FeatureStats(torch.randn(2048).double(), torch.eye(2048).double(), 5)
    path = stats.save(tmp_path / "s.safetensors", {"network_sha256": net.sha256})
    back, meta = FeatureStats.load(path)
    assert torch.equal(back.mu, stats.mu) and back.count == 5 and meta["network_sha256"] == net.sha256
    got, _, cached = reference_stats(str(path), net, 32)
    assert cached and torch.equal(got.sigma, stats.sigma)
    other = stats.save(tmp_path / "o.safetensors", {"network_sha256": "0" * 64})
    with pytest.raises(UserError, match="another Inception network"):
        reference_stats(str(other), net, 32)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a safetensors"):
        FeatureStats.load(tmp_path / "bad.safetensors")


def test_bad_inception_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a TorchScript"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_inception_score_with_classifier_logits():
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(in_channels=1, num_classes=10, width=8, image_size=32))
    x = smooth_images(40, seed=4, channels=1)
    mean, std = inception_score([x[:20], x[20:]], ClassifierLogits(clf), splits=4)
    assert math.isfinite(mean) and mean >= 1.0 and math.isfinite(std)
    # a logits network that is certain and uniform over classes gives the maximum, K
    eye = torch.eye(10).repeat(4, 1) * 50.0  # (40, 10)

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return eye[: images.shape[0]]

    mean_max, _ = inception_score([x], Fixed(), splits=1)
    assert mean_max == pytest.approx(10.0, rel=1e-3)
    with pytest.raises(UserError, match="at least 10 images"):
        inception_score([x[:5]], ClassifierLogits(clf), splits=10)


def _tiny_vae(tmp_path):
    from rqvae.models.vae import RQVAE

    torch.manual_seed(0)
    vae = RQVAE.from_preset("tiny", in_channels=1)
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    return vae, path


@pytest.mark.slow  # FID's eigvals of a 2048x2048 product take ~20 s on one CPU core
def test_evaluate_tokenizer_rfid_recon_and_cache(net, tmp_path):
    vae, _ = _tiny_vae(tmp_path)
    data = tmp_path / "val"
    write_pngs(data, smooth_images(5, seed=5, channels=1))
    before = net.images_seen
    cache = tmp_path / "c"
    r1 = evaluate_tokenizer(vae, str(data), split="test", batch_size=8, net=net, cache_dir=cache)
    assert net.images_seen == before + 10  # originals + reconstructions
    assert r1["num_images"] == 5 and not r1["reference_cached"]
    assert math.isfinite(r1["rfid"]) and r1["rfid"] > 0
    assert [d["depth"] for d in r1["per_depth"]] == [1, 2, 3, 4]
    for d in r1["per_depth"]:
        assert d["mse"] > 0 and math.isfinite(d["psnr"]) and -1 <= d["ssim"] <= 1
    # MSE and PSNR computed independently: per image on [-1, 1] (PSNR on [0, 1] = 10 log10(4 / MSE)),
    # averaged over images; float32 sums bound the difference far below 1e-4 dB
    x = load_images(sorted(data.iterdir()), 1, vae.config.image_size)
    with torch.no_grad():
        codes = vae.encode(x)
        for d in r1["per_depth"]:
            mse = (vae.decode(codes, depth=d["depth"]).clamp(-1, 1) - x).double().pow(2).mean(dim=(1, 2, 3))
            assert d["mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
            assert d["psnr"] == pytest.approx(float((10 * torch.log10(4.0 / mse)).mean()), abs=1e-4)
    assert len(r1["code_usage"]["used"]) == 4 and all(1 <= u <= 64 for u in r1["code_usage"]["used"])
    r2 = evaluate_tokenizer(vae, str(data), split="test", batch_size=8, net=net, cache_dir=cache,
                                    depths=[4])
    assert r2["reference_cached"] and net.images_seen == before + 15  # only the reconstructions this time
    assert r2["rfid"] == pytest.approx(r1["rfid"], rel=1e-6, abs=1e-6)
    assert r2["per_depth"][0] == pytest.approx(r1["per_depth"][3])
    with pytest.raises(UserError, match="depths"):
        evaluate_tokenizer(vae, str(data), depths=[5], rfid=False)


@pytest.mark.slow  # FID's eigvals of a 2048x2048 product take ~20 s on one CPU core
def test_cli_eval_fid_and_recon(net, tmp_path, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_pngs(gen, smooth_images(4, seed=6))
    write_pngs(ref, smooth_images(4, seed=7))
    stats = tmp_path / "ref.safetensors"
    out = tmp_path / "r.json"
    assert main(["eval", "--ref", str(ref), "--image-size", "32", "--save-stats", str(stats),
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    assert stats.is_file()
    assert main(["eval", "--fid", str(gen), "--ref", str(stats), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["fid"]["num_generated"] == 4 and res["fid"]["num_reference"] == 4 and res["fid"]["fid"] > 0
    assert "FID" in capsys.readouterr().out
    _, vae_dir = _tiny_vae(tmp_path)
    val = tmp_path / "val"
    write_pngs(val, smooth_images(4, seed=8, channels=1))
    assert main(["eval", "--recon", "--model", str(vae_dir), "--data", str(val), "--depths", "1,4",
                 "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert [d["depth"] for d in res["tokenizer"]["per_depth"]] == [1, 4]
    assert "PSNR" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval"], "nothing to evaluate"),
    (["eval", "--fid", "x"], "--fid needs --ref"),
    (["eval", "--recon", "--data", "fmnist"], "--model"),
    (["eval", "--is", "x"], "--classifier"),
    (["eval", "--fid", "/nonexistent/gen", "--ref", "fmnist", "--image-size", "32"], "not a folder"),
])
def test_cli_eval_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_eval_accuracy_and_classifier_score(tmp_path, capsys):
    x = smooth_images(12, seed=10, size=16, channels=1)
    write_pngs(tmp_path / "pool", x)
    pngs = sorted((tmp_path / "pool").iterdir())
    images = load_images(pngs, 1, 16)  # (12, 1, 16, 16): what eval reads back from the PNGs
    labels = torch.arange(12) % 3  # the class each image is filed under
    chosen = labels.clone()
    chosen[:2] = (labels[:2] + 1) % 3  # the classifier disagrees on exactly two images
    clf = classifier_choosing(images, chosen, 3, class_names=("a", "b", "c"))
    clf.save_pretrained(tmp_path / "clf")
    gen = tmp_path / "gen"
    for i, png in enumerate(pngs):
        folder = gen / ("0", "b", "2")[int(labels[i])]  # sub-folders named by class id or class name
        folder.mkdir(parents=True, exist_ok=True)
        png.rename(folder / png.name)
    out = tmp_path / "r.json"
    assert main(["eval", "--accuracy", str(gen), "--is", str(gen), "--classifier", str(tmp_path / "clf"),
                 "--is-splits", "2", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())["classifier"]
    assert res["num_samples"] == 12
    assert res["accuracy"] == pytest.approx(10 / 12, abs=1e-6)  # every folder mapped to its class
    assert res["classifier_score"] >= 1.0
    assert "accuracy" in capsys.readouterr().out
    write_pngs(tmp_path / "bad" / "zebra", smooth_images(2, seed=1, size=16, channels=1))
    assert main(["eval", "--accuracy", str(tmp_path / "bad"), "--classifier", str(tmp_path / "clf")]) == 2
    assert "neither a class id" in capsys.readouterr().err


def test_cli_eval_fid_floor_is_real_images_against_the_reference(net, tmp_path, capsys):
    root, gen = tmp_path / "data", tmp_path / "gen"
    write_pngs(root / "train", smooth_images(5, seed=11))
    write_pngs(root / "test", smooth_images(5, seed=12))
    write_pngs(gen, torch.rand(5, 3, 32, 32) * 2 - 1)  # white noise: far from the data
    out = tmp_path / "r.json"
    assert main(["eval", "--fid", str(gen), "--ref", str(root), "--ref-split", "test", "--floor-split",
                 "train", "--cache-dir", str(tmp_path / "c"), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())["fid"]
    test = compute_stats([load_images(sorted((root / "test").glob("*.png")), 3, 32)], net)
    want = frechet_distance([load_images(sorted((root / "train").glob("*.png")), 3, 32)], test, net)[0]
    assert res["floor"] == pytest.approx(want, rel=1e-6)
    assert res["fid"] > 2 * res["floor"]  # noise is far worse than real images of the other split
    captured = capsys.readouterr()
    assert "floor" in captured.out and "biased upwards" in captured.err
