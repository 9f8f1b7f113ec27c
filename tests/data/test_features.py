import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rqvae.data.features import load_or_build_features
from rqvae.errors import UserError


class CountingEncoder(nn.Module):
    """Stands in for an RQ-VAE: encode_latent (B, C, 8, 8) -> (B, 2, 2, 4), counting its calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 4, stride=4)
        self.calls = 0

    def encode_latent(self, images):
        self.calls += 1
        return self.conv(images).permute(0, 2, 3, 1)


class ListDataset:
    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


def _vae_dir(tmp_path, enc, name="vae"):
    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(d / "model.safetensors"))
    return d


def _build(enc, vae_dir, ds, cache, **kw):
    return load_or_build_features(enc, vae_dir, ds, data_spec="mem", image_size=8, channels=1,
                                  cache_dir=cache, batch_size=4, progress=False, **kw)


def test_cache_built_once_reused_and_keyed(tmp_path):
    enc, ds, cache = CountingEncoder(), ListDataset(), tmp_path / "cache"
    vae_dir = _vae_dir(tmp_path, enc)
    fc = _build(enc, vae_dir, ds, cache)
    assert enc.calls == 3  # ceil(10 / 4) batches
    assert fc.latents.shape == (10, 2, 2, 4) and fc.latents.dtype == torch.float16
    assert torch.equal(fc.labels, ds.labels)
    with torch.no_grad():
        ref = enc.encode_latent(ds.images).to(torch.float16)
    torch.testing.assert_close(fc.latents, ref)
    assert fc[3]["label"] == 0 and fc[3]["latent"].shape == (2, 2, 4)

    enc.calls = 0
    fc2 = _build(enc, vae_dir, ds, cache)  # second run: read from disk, encoder never called
    assert enc.calls == 0 and fc2.path == fc.path and torch.equal(fc2.latents, fc.latents)

    # A different VAE (other weights file) or different data gives a new cache.
    enc2 = CountingEncoder()
    with torch.no_grad():
        enc2.conv.weight.add_(1.0)
    fc3 = _build(enc2, _vae_dir(tmp_path, enc2, "vae2"), ds, cache)
    assert enc2.calls == 3 and fc3.path != fc.path
    fc4 = _build(enc, vae_dir, ListDataset(n=12), cache)
    assert fc4.path not in (fc.path, fc3.path) and len(fc4) == 12
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        {fc.path.name, fc3.path.name, fc4.path.name})


def test_flip_copy_and_captions(tmp_path):
    enc, ds = CountingEncoder(), ListDataset(n=6)
    caps = [f"caption {i}" for i in range(6)]
    fc = _build(enc, _vae_dir(tmp_path, enc), ds, tmp_path / "c", flip=True, captions=caps)
    assert len(fc) == 12 and fc.meta["augmentation"] == "hflip"
    with torch.no_grad():
        flipped = enc.encode_latent(ds.images.flip(-1)).to(torch.float16)
    torch.testing.assert_close(fc.latents[6:], flipped)
    assert torch.equal(fc.labels[6:], fc.labels[:6]) and fc.captions == caps + caps


def test_errors(tmp_path):
    enc, ds = CountingEncoder(), ListDataset(n=4)
    with pytest.raises(UserError, match="model.safetensors is missing"):
        _build(enc, tmp_path / "nope", ds, tmp_path / "c")
    with pytest.raises(UserError, match="got 2 captions for 4 images"):
        _build(enc, _vae_dir(tmp_path, enc), ds, tmp_path / "c", captions=["a", "b"])
