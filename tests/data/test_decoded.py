"""The decoded-image cache of image folders, and the one-line warning for huge images."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import rqvae.data.decoded as decoded
import rqvae.data.images as images
from rqvae.data import ImageFolderDataset, batches, load_image


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Every cache under tmp_path, the switch at its default, no huge image reported yet in this process."""
    monkeypatch.delenv("RQVAE_CACHE", raising=False)
    monkeypatch.delenv(decoded.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(images, "_huge_reported", set())
    monkeypatch.setattr(images, "_huge_pending", {})
    return tmp_path / "xdg" / "rqvae" / "images"


def _save(path, seed: int, size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").convert(mode).save(path)


def _folder(root, sizes=((12, 10), (10, 17), (8, 8))):
    root.mkdir()
    for i, size in enumerate(sizes):
        _save(root / f"{i}.png", i, size)
    return root


def _entries(cache):
    return sorted(cache.rglob("*.npy")) if cache.exists() else []


@pytest.mark.parametrize("resize_mode,channels", [("crop", 3), ("pad", 3), ("crop", 1)])
def test_cache_gives_the_pixels_of_a_direct_decode(tmp_path, tmp_cache, monkeypatch, resize_mode, channels):
    root = _folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root, 8, channels, augment=True, resize_mode=resize_mode)
    assert ds.decoded is not None and len(_entries(tmp_cache)) == 3  # the scan filled the cache
    for i, (path, _) in enumerate(ds.samples):
        for seed in (0, 1, 2, 3):  # random crops and flips on top of the cached image
            direct = load_image(path, 8, channels, True, torch.Generator().manual_seed(seed),
                                resize_mode=resize_mode)
            assert torch.equal(ds[(i, seed)]["image"], direct)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decoded, "decode_image", no_decoding)
    again = ImageFolderDataset(root, 8, channels, augment=True, resize_mode=resize_mode)  # a later run
    assert torch.equal(again[(1, 5)]["image"], ds[(1, 5)]["image"])
    other = ImageFolderDataset(root, 8, channels, augment=True, resize_mode=resize_mode, cache=False)
    assert torch.equal(other[(1, 5)]["image"], ds[(1, 5)]["image"])


def test_edited_file_is_decoded_again(tmp_path, tmp_cache):
    root = _folder(tmp_path / "imgs")
    before = ImageFolderDataset(root, 8, 3)[0]["image"]
    _save(root / "0.png", seed=42)  # same size in pixels, new content
    st = os.stat(root / "0.png")
    os.utime(root / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # new mtime even on coarse clocks
    after = ImageFolderDataset(root, 8, 3)[0]["image"]
    assert torch.equal(after, load_image(root / "0.png", 8, 3)) and not torch.equal(after, before)
    assert len(_entries(tmp_cache)) == 4  # the old version's entry is left, never read again


def test_unreadable_entry_is_written_again(tmp_path, tmp_cache):
    root = _folder(tmp_path / "imgs", sizes=((12, 10),))
    ds = ImageFolderDataset(root, 8, 3)
    (entry,) = _entries(tmp_cache)
    entry.write_bytes(entry.read_bytes()[:20])  # a torn entry (cannot happen with the rename, but disks fail)
    assert torch.equal(ds[0]["image"], load_image(root / "0.png", 8, 3))
    assert np.load(entry).shape == (8, 10, 3)  # rewritten: short side 8, long side kept for random crops


def test_off_switch_and_unwritable_cache(tmp_path, tmp_cache, monkeypatch, caplog):
    root = _folder(tmp_path / "imgs")
    assert ImageFolderDataset(root, 8, 3, cache=False).decoded is None
    monkeypatch.setenv(decoded.CACHE_ENV, "0")
    ds = ImageFolderDataset(root, 8, 3)
    assert ds.decoded is None and ds[0]["image"].shape == (3, 8, 8) and not _entries(tmp_cache)
    monkeypatch.delenv(decoded.CACHE_ENV)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("RQVAE_CACHE", str(tmp_path / "file"))
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        ds = ImageFolderDataset(root, 8, 3)
        assert torch.equal(ds[2]["image"], load_image(root / "2.png", 8, 3))
    assert caplog.text.count("cannot write the decoded-image cache") == 1


@pytest.mark.parametrize("cache", [True, False])
def test_huge_images_named_in_one_line_over_two_epochs(tmp_path, monkeypatch, caplog, cache):
    root = _folder(tmp_path / "imgs")  # 120, 170 and 64 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)  # 12x10 and 10x17 count as huge
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        ds = ImageFolderDataset(root, 8, 3, cache=cache)
        it = batches(ds, 3, seed=0)
        for _ in range(2):  # two epochs
            next(it)
    lines = [r.getMessage() for r in caplog.records if "Mpx" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "2 images over 0 Mpx are decoded (slow)" in lines[0]
    assert "0.png" in lines[0] and "1.png" in lines[0] and "2.png" not in lines[0]
    assert "1 over PIL's decompression-bomb limit" in lines[0]  # 170 > 2 x 80: PIL refuses it, we decode it
    assert ("cached after the first decode" in lines[0]) == cache


def test_lazy_folder_names_each_huge_image_once(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        ds = ImageFolderDataset(root, 8, 3, cache=False, eager_scan_limit=0)  # decoded while loading
        it = batches(ds, 3, seed=0)
        for _ in range(3):  # three epochs, each decoding every file again
            next(it)
    lines = [r.getMessage() for r in caplog.records if "Mpx" in r.getMessage()]
    assert sorted(os.path.basename(line.split(": ")[1].split(";")[0]) for line in lines) == ["0.png", "1.png"]


def test_huge_image_in_the_scan_warns_without_pil_warning(tmp_path, monkeypatch, caplog, recwarn):
    root = _folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 10x17 only
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        ds = ImageFolderDataset(root, 8, 3)
        for i in range(3):
            ds[i]
        ImageFolderDataset(root, 8, 3, cache=False)  # decodes again in this process: named once only
    lines = [r.getMessage() for r in caplog.records if "Mpx" in r.getMessage()]
    assert len(lines) == 1 and "1 image over 0 Mpx is decoded (slow)" in lines[0] and "1.png" in lines[0]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
