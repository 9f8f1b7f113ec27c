"""Fashion-MNIST from its IDX files (``fmnist`` or ``fmnist:/dir`` as a data spec)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rqvae.data.common import check_args
from rqvae.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from rqvae.data.tensor import TensorImageDataset
from rqvae.errors import UserError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST from its IDX files (``train-*`` 60k images, ``t10k-*`` 10k images), 28x28 grayscale.

    For ``image_size > 28`` the images are zero-padded (background -1) to the size, centered; for smaller
    sizes they are resized (bilinear, antialiased). ``augment`` flips horizontally at random."""

    def __init__(self, root: str | os.PathLike = FMNIST_DIR, image_size: int = 32, channels: int = 1,
                 split: str = "train", augment: bool = False):
        check_args(image_size, channels)
        root = Path(root)
        prefix = {"train": "train", "test": "t10k", "t10k": "t10k", "val": "t10k"}.get(split)
        if prefix is None:
            raise UserError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        files = {}
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise UserError(f"Fashion-MNIST file {cands[0]} not found; install the Debian package "
                                "dataset-fashion-mnist (make data) or pass fmnist:/dir/with/idx/files")
            files[kind] = found
        images = read_idx(files["images-idx3-ubyte"], IMAGES_MAGIC)
        labels = read_idx(files["labels-idx1-ubyte"], LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(f"{files['images-idx3-ubyte']} has {len(images)} images but "
                            f"{files['labels-idx1-ubyte']} has {len(labels)} labels; re-download the files")
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        h, w = x.shape[-2:]
        if image_size >= max(h, w):  # pad (0 -> -1 background), centered
            top, left = (image_size - h) // 2, (image_size - w) // 2
            x = F.pad(x, (left, image_size - w - left, top, image_size - h - top))
        else:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        super().__init__(x, torch.from_numpy(labels.astype(np.int64)), FMNIST_CLASSES, channels=channels,
                         augment=augment)
        self.root = root
        self.split = split
