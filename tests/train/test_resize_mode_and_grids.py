"""--resize-mode reaches every dataset both training tasks build (training and validation data, and the AR
feature cache key), and the sample grids of both tasks carry their labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.distributed import DistInfo
from rqvae.eval.figures import coarse_to_fine_grid, labelled_coarse_to_fine_grid
from rqvae.train import ar_cond
from rqvae.train.ar import ARTask, TrainARConfig
from rqvae.train.vae import TrainVAEConfig, VAETask

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_tall_images(folder, n=8, seed=0):
    """Two classes of 16 x 32 (width x height) images: not square, so crop and pad differ."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(32, 16, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tall")
    return write_tall_images(root / "train"), write_tall_images(root / "val", seed=1)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_vae_task_builds_training_and_validation_data_with_the_resize_mode(tmp_path, data, mode):
    train, val = data
    cfg = TrainVAEConfig(data=str(train), val_data=str(val), run_dir=str(tmp_path / "run"), preset="tiny",
                         resize_mode=mode, augment=True)
    task = VAETask(cfg)
    task.prepare(CPU)
    assert task.dataset.resize_mode == mode and task.val_dataset.resize_mode == mode
    split = VAETask(TrainVAEConfig(data=str(train), val_split=0.25, run_dir=str(tmp_path / "r2"),
                                   preset="tiny", resize_mode=mode, augment=True))
    split.prepare(CPU)  # the held-out part is rebuilt without augmentation: with the same resize mode
    held = split.val_dataset.dataset
    assert held.resize_mode == mode and not held.augment


def test_ar_task_resize_mode_reaches_data_validation_data_and_the_feature_cache(tmp_path, data, vae_dir):
    train, val = data
    tasks = {}
    for mode in ("crop", "pad"):
        cfg = TrainARConfig(vae=str(vae_dir), data=str(train), val_data=str(val), preset="tiny",
                            run_dir=str(tmp_path / mode), feature_cache=str(tmp_path / "cache"),
                            resize_mode=mode, progress=False)
        tasks[mode] = task = ARTask(cfg)
        task.prepare(CPU)
        assert task.dataset.resize_mode == mode
    crop, pad = tasks["crop"], tasks["pad"]
    assert crop.cache.path != pad.cache.path  # one cache entry per mode
    assert not torch.equal(crop.cache.latents, pad.cache.latents)
    assert not torch.equal(crop.val[0], pad.val[0])  # the validation features follow the mode too


def test_vae_sample_grid_is_the_labelled_coarse_to_fine_figure(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    from rqvae.data import TensorImageDataset

    cfg = TrainVAEConfig(data="mem", run_dir=str(tmp_path / "run"), preset="tiny", image_size=16,
                         model={"ch": 16, "codebook_size": 32})
    task = VAETask(cfg, TensorImageDataset(images, torch.zeros(4, dtype=torch.long)))
    task.prepare(CPU)
    task.build(CPU)
    grid = task.sample(0)
    assert torch.equal(grid, labelled_coarse_to_fine_grid(task.model, task.sample_images))
    assert grid.shape[-1] > coarse_to_fine_grid(task.model, task.sample_images).shape[-1]  # a label column


def test_ar_sample_grid_rows_are_labelled_with_the_class_names(tmp_path, data, vae_dir, monkeypatch):
    train, _ = data
    cfg = TrainARConfig(vae=str(vae_dir), data=str(train), run_dir=str(tmp_path / "run"), preset="tiny",
                        feature_cache=str(tmp_path / "cache"), samples_per_class=2, progress=False)
    task = ARTask(cfg)
    task.prepare(CPU)
    task.build(CPU)
    seen = {}
    real = ar_cond.label_grid

    def recording(grid, col_labels=(), row_labels=(), **kw):
        seen["rows"], seen["shape"] = list(row_labels), tuple(grid.shape)
        return real(grid, col_labels, row_labels, **kw)

    monkeypatch.setattr(ar_cond, "label_grid", recording)
    grid = task.sample(0)
    assert seen["rows"] == ["class0", "class1"]
    assert grid.shape[-1] > seen["shape"][-1]  # the names stand left of the rows
