import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.data import (
    FMNIST_DIR,
    FashionMNIST,
    ImageFolderDataset,
    TensorImageDataset,
    WebImageDataset,
    batches,
    build_image_dataset,
    epoch_order,
    load_image,
    make_loader,
    steps_per_epoch,
)
from rqvae.errors import UserError

HAVE_FMNIST = Path(FMNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file()


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- images

def test_modes_convert_to_rgb_and_l(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 1  # palette index 1 is transparent; index 0 is red
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black -> white on white
    cases = {
        "p.png": (pal, (1.0, -1.0, -1.0)),
        "rgba.png": (half, (1.0, 1.0, 1.0)),
        "la.png": (Image.new("LA", (8, 8), (0, 255)), (-1.0, -1.0, -1.0)),
        "i16.png": (Image.fromarray(np.full((8, 8), 65535, np.uint16)), (1.0, 1.0, 1.0)),
        "i32.tif": (Image.fromarray(np.full((8, 8), 0, np.int32), "I"), (-1.0, -1.0, -1.0)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
        "bw.png": (Image.new("1", (8, 8), 1), (1.0, 1.0, 1.0)),
        "gray.png": (Image.new("L", (8, 8), 0), (-1.0, -1.0, -1.0)),
    }
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        x = load_image(tmp_path / name, 8, 3)
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32, name
        assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(rgb), atol=0.03), (name, x.mean(dim=(1, 2)))
        g = load_image(tmp_path / name, 8, 1)
        assert g.shape == (1, 8, 8) and -1 <= g.min() and g.max() <= 1


def test_resize_shorter_side_center_crop_and_upscale(tmp_path):
    arr = np.zeros((32, 64), np.uint8)
    arr[:, 32:] = 255  # left half black, right half white
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 16, 1)  # -> 32x16 -> center crop cols 8..24
    assert x.shape == (1, 16, 16)
    assert (x[0, :, :7] == -1).all() and (x[0, :, 9:] == 1).all()
    Image.new("RGB", (4, 6), (255, 0, 0)).save(tmp_path / "tiny.png")
    y = load_image(tmp_path / "tiny.png", 16, 3)  # smaller than S: upscaled, not dropped
    assert y.shape == (3, 16, 16) and torch.allclose(y[0], torch.ones(16, 16))


def test_augment_is_seeded_random_crop_and_flip(tmp_path):
    _rgb(0, (40, 20)).save(tmp_path / "a.png")
    outs = {tuple(load_image(tmp_path / "a.png", 16, 3, True, torch.Generator().manual_seed(s)).flatten()[:50]
                  .tolist()) for s in range(12)}
    assert len(outs) > 3  # crops / flips differ across seeds
    a = load_image(tmp_path / "a.png", 16, 3, True, torch.Generator().manual_seed(5))
    b = load_image(tmp_path / "a.png", 16, 3, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- folders

def _make_folder(root: Path) -> None:
    for ci, cls in enumerate(["cat", "ant"]):  # sorted names -> ids: ant=0, cat=1
        (root / cls / "deep").mkdir(parents=True)
        for i in range(3):
            _rgb(10 * ci + i).save(root / cls / f"{i}.png")
        _rgb(99).save(root / cls / "deep" / "x.jpg")
    good = _png_bytes(_rgb(7, (64, 64)))
    (root / "ant" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "ant" / "empty.png").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    _rgb(3).save(root / "stray.png")  # beside the class folders


def test_folder_labels_and_bad_files_skipped(tmp_path, caplog):
    _make_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        ds = build_image_dataset(str(tmp_path), 16, 3)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["ant", "cat"] and ds.num_classes == 2
    assert len(ds) == 8
    assert sorted(ds.samples[i][1] for i in range(8)) == [0] * 4 + [1] * 4
    skipped = {Path(p).name: r for p, r in ds.skipped}
    assert set(skipped) == {"truncated.png", "empty.png", "notes.txt", "stray.png"}
    assert "empty" in skipped["empty.png"] and "class sub-folder" in skipped["stray.png"]
    assert "skipped 4 of 12 files" in caplog.text and "truncated.png" in caplog.text
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and isinstance(s["label"], int)


def test_folder_without_subfolders_and_splits(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(2 if split == "train" else 3):
            _rgb(i).save(tmp_path / split / f"{i}.png")
    train = build_image_dataset(str(tmp_path), 8, 1)
    test = build_image_dataset(str(tmp_path), 8, 1, split="test")
    assert (len(train), len(test)) == (2, 3)
    assert train.num_classes == 1 and {train[i]["label"] for i in range(2)} == {0}
    assert train[0]["image"].shape == (1, 8, 8)


def test_no_usable_images_and_missing_paths(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "b.jpg").write_text("hello")
    with pytest.raises(UserError, match=r"no usable images in .*bad: 2 files skipped"):
        build_image_dataset(str(tmp_path / "bad"), 16, 3)
    with pytest.raises(UserError, match="does not exist"):
        build_image_dataset(str(tmp_path / "nope"), 16, 3)
    with pytest.raises(UserError, match="is a file"):
        build_image_dataset(str(tmp_path / "bad" / "b.jpg"), 16, 3)
    with pytest.raises(UserError, match="channels"):
        build_image_dataset(str(tmp_path), 16, 2)
    with pytest.raises(UserError, match="shards do not exist"):
        build_image_dataset(str(tmp_path / "s-{0..3}.tar"), 16, 3)


def test_lazy_folder_substitutes_bad_file(tmp_path, caplog):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        _rgb(i).save(d / f"{i}.png")
    (d / "1.png").write_bytes(b"\x89PNG broken")  # fails only when read (lazy folders check extensions)
    (d / "readme.md").write_text("x")
    ds = ImageFolderDataset(d, 8, 3, eager_scan_limit=0)
    assert ds.lazy and len(ds) == 4 and [Path(p).name for p, _ in ds.skipped] == ["readme.md"]
    with caplog.at_level(logging.WARNING, logger="rqvae.data"):
        x = ds[1]["image"]
    assert torch.equal(x, ds[2]["image"])  # replaced by the next usable image
    assert "1.png" in caplog.text and [Path(p).name for p, _ in ds.skipped][-1] == "1.png"
    b = next(batches(ds, 4, seed=0))
    assert b["image"].shape == (4, 3, 8, 8)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST IDX files not installed")
def test_fmnist_padding_resize_channels():
    ds = build_image_dataset("fmnist", 32, 1, split="test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 10000 and ds.num_classes == 10
    x = ds[0]["image"]
    assert x.shape == (1, 32, 32) and (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()
    assert x.max() > 0.5 and 0 <= ds[0]["label"] < 10
    assert ds[0]["label"] == 9  # the first test image is an ankle boot
    small = build_image_dataset(f"fmnist:{FMNIST_DIR}", 16, 3, split="test")
    assert small[0]["image"].shape == (3, 16, 16)
    same = build_image_dataset("fmnist", 28, 1, split="test")
    assert torch.equal(same[0]["image"], x[:, 2:30, 2:30])


def test_fmnist_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="not found"):
        FashionMNIST(tmp_path, 32, 1, split="test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\0" * 20)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\0" * 20)
    with pytest.raises(UserError, match="not a valid IDX"):
        build_image_dataset(f"fmnist:{tmp_path}", 32, 1, split="test")
    with pytest.raises(UserError, match="split"):
        FashionMNIST(tmp_path, 32, 1, split="dev")


# ---------------------------------------------------------------------------------------------- loader

def _toy(n=10, augment=False) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    return TensorImageDataset(imgs, torch.arange(n), augment=augment)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_loader_order_is_seeded_and_resumable():
    ds = _toy(10)
    assert steps_per_epoch(10, 3) == 3
    full = _take(batches(ds, 3, seed=7), 8)  # crosses two epoch boundaries
    epoch0 = torch.cat([b["label"] for b in full[:3]])
    assert len(set(epoch0.tolist())) == 9  # no repeats inside an epoch (one left over, dropped)
    assert not torch.equal(epoch0, torch.cat([b["label"] for b in full[3:6]]))  # reshuffled per epoch
    for start in (1, 3, 5):
        resumed = _take(batches(ds, 3, seed=7, start_step=start), 8 - start)
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
    other = _take(batches(ds, 3, seed=8), 3)
    assert not all(torch.equal(a["label"], b["label"]) for a, b in zip(full, other))
    assert full[0]["image"].shape == (3, 1, 4, 4) and full[0]["image"].dtype == torch.float32


def test_loader_ranks_partition_each_epoch():
    n, world = 11, 3
    seen = []
    for rank in range(world):
        order, _ = epoch_order(n, seed=1, epoch=4, rank=rank, world_size=world)
        assert len(order) == 4
        seen += order.tolist()
    assert set(seen) == set(range(n)) and len(seen) == 12  # padded by wrapping, like DistributedSampler
    ds = _toy(12)
    r0 = torch.cat([b["label"] for b in _take(batches(ds, 2, 3, rank=0, world_size=2), 3)])
    r1 = torch.cat([b["label"] for b in _take(batches(ds, 2, 3, rank=1, world_size=2), 3)])
    assert sorted(r0.tolist() + r1.tolist()) == list(range(12))


def test_augment_identical_after_resume_and_with_workers(tmp_path):
    for i in range(6):
        _rgb(i, (20, 12)).save(tmp_path / f"{i}.png")
    ds = build_image_dataset(str(tmp_path), 8, 3, augment=True)
    full = _take(batches(ds, 2, seed=3), 5)
    resumed = _take(batches(ds, 2, seed=3, start_step=2), 3)
    workers = _take(iter(make_loader(ds, 2, seed=3, start_step=2, num_workers=2)), 3)
    for a, b, c in zip(full[2:], resumed, workers):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
    flips = _toy(8, augment=True)
    x = _take(batches(flips, 8, seed=0), 1)[0]["image"]
    y = _take(batches(flips, 8, seed=0), 1)[0]["image"]
    assert torch.equal(x, y)


def test_loader_errors_and_tensor_dataset_checks():
    with pytest.raises(UserError, match="fewer than batch size"):
        next(batches(_toy(5), 4, rank=0, world_size=2))
    with pytest.raises(UserError, match=r"\(N, C, H, W\)"):
        TensorImageDataset(torch.zeros(3, 4, 4))
    with pytest.raises(UserError, match="labels must have shape"):
        TensorImageDataset(torch.zeros(3, 1, 4, 4), [0, 1])
    ds = TensorImageDataset(torch.full((2, 3, 4, 4), 0.5))
    assert ds.num_classes == 1 and torch.allclose(ds[1]["image"], torch.full((3, 4, 4), 0.5))


# ---------------------------------------------------------------------------------------------- WebDataset

def _write_shards(root: Path, n_shards=3, per_shard=6) -> list[int]:
    labels = []
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for i in range(per_shard):
                idx = s * per_shard + i
                entries = {"cls": str(idx).encode()}
                if idx == 4:
                    entries["png"] = b"garbage, not a png"  # undecodable: skipped and counted
                elif idx == 9:
                    entries["json"] = b"{}"  # no image at all
                else:
                    entries["png" if idx % 2 else "jpg"] = _png_bytes(_rgb(idx), "PNG" if idx % 2 else "JPEG")
                    labels.append(idx)
                for ext, data in entries.items():
                    info = tarfile.TarInfo(f"{idx:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return labels


def test_webdataset_stream_decodes_skips_and_splits(tmp_path):
    good = _write_shards(tmp_path)
    ds = build_image_dataset(str(tmp_path / "shard-{0..2}.tar"), 8, 3, shuffle_buffer=4)
    assert isinstance(ds, WebImageDataset) and ds.num_classes == 6  # labels 0..5 in the first shard
    one_epoch = list(ds)
    assert sorted(s["label"] for s in one_epoch) == good
    assert ds.skipped_count == 2 and one_epoch[0]["image"].shape == (3, 8, 8)
    assert ds[3]["label"] == 3 and ds[4]["label"] == 5  # previews in shard order; 4 does not decode
    for n_streams in (2, 5):  # shard-level split, then sample-level split (fewer shards than streams)
        keys = [s["__key__"] for k in range(n_streams) for s in ds.raw_samples(1, k, n_streams)]
        assert sorted(keys) == [f"{i:05d}" for i in range(18)]
    e0 = [s["__key__"] for s in ds.raw_samples(0, 0, 1)]
    e1 = [s["__key__"] for s in ds.raw_samples(1, 0, 1)]
    assert e0 != e1 and sorted(e0) == sorted(e1)


def test_webdataset_loader_resumes_exactly(tmp_path):
    _write_shards(tmp_path)
    ds = WebImageDataset(str(tmp_path / "shard-{0..2}.tar"), 8, 1, augment=True, shuffle_buffer=5)
    full = _take(iter(make_loader(ds, 4, seed=2)), 9)  # 2 epochs of 18 positions
    assert all(b["image"].shape == (4, 1, 8, 8) for b in full)
    resumed = _take(iter(make_loader(ds, 4, seed=2, start_step=5)), 4)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
    w_full = _take(iter(make_loader(ds, 3, seed=2, num_workers=2)), 7)
    w_res = _take(iter(make_loader(ds, 3, seed=2, start_step=3, num_workers=2)), 4)
    for a, b in zip(w_full[3:], w_res):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])


def test_webdataset_without_usable_images(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        data = b"nope"
        info = tarfile.TarInfo("00000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="no usable images"):
        build_image_dataset(str(tmp_path / "bad.tar"), 8, 3)
