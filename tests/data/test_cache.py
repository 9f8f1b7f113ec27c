"""One cache root for every cache (RQVAE_CACHE, else XDG_CACHE_HOME/rqvae, else ~/.cache/rqvae) and one
dataset fingerprint."""

import os

import torch

from rqvae.data import TensorImageDataset
from rqvae.data.cache import cache_dir, cache_root, data_fingerprint
from rqvae.data.features import load_or_build_features
from rqvae.eval.fid import reference_stats
from rqvae.eval.inception import InceptionFeatures
from tests.data.test_features import CountingEncoder, ListDataset, _vae_dir
from tests.eval.test_metrics import smooth_images, write_pngs


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RQVAE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert str(cache_root()) == os.path.join(os.path.expanduser("~"), ".cache", "rqvae")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rqvae"
    monkeypatch.setenv("RQVAE_CACHE", str(tmp_path / "own"))
    assert cache_dir("fid_stats") == tmp_path / "own" / "fid_stats"
    assert cache_dir("fid_stats", tmp_path / "given") == tmp_path / "given"


def test_xdg_cache_home_holds_feature_and_fid_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("RQVAE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    enc = CountingEncoder()
    feats = load_or_build_features(enc, _vae_dir(tmp_path, enc), ListDataset(), data_spec="mem", image_size=8,
                                   channels=1, batch_size=4, progress=False)
    assert feats.path.parent == tmp_path / "xdg" / "rqvae" / "features"
    write_pngs(tmp_path / "ref", smooth_images(2, seed=0))
    _, stats_file, cached = reference_stats(str(tmp_path / "ref"), InceptionFeatures(), 32, batch_size=2)
    assert not cached and stats_file.is_file()
    assert stats_file.parent == tmp_path / "xdg" / "rqvae" / "fid_stats"


def test_fingerprint_follows_the_data(tmp_path):
    write_pngs(tmp_path / "d", smooth_images(2, seed=0))
    before = data_fingerprint(str(tmp_path / "d"))
    assert data_fingerprint(str(tmp_path / "d")) == before
    write_pngs(tmp_path / "d", smooth_images(3, seed=1))  # two files rewritten, one added
    assert data_fingerprint(str(tmp_path / "d")) != before
    assert data_fingerprint("shards/{000..009}.tar") != data_fingerprint("shards/{000..008}.tar")
    x = torch.zeros(2, 1, 4, 4)
    a = data_fingerprint(TensorImageDataset(x))
    assert data_fingerprint(TensorImageDataset(x.clone())) == a
    assert data_fingerprint(TensorImageDataset(x + 0.5)) != a  # pixels
    assert data_fingerprint(TensorImageDataset(x, labels=[0, 1])) != a  # labels
