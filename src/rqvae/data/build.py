"""A dataset from a data spec string: an image folder, a ``.tar`` shard pattern or ``fmnist``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from rqvae.data.decoded import IMAGE_CACHE_HELP
from rqvae.data.fmnist import FMNIST_DIR, FashionMNIST
from rqvae.data.folder import ImageFolderDataset
from rqvae.data.images import HUGE_IMAGES_HELP, check_resize_mode
from rqvae.data.webdataset import WebImageDataset
from rqvae.errors import UserError

# The --data help of the training commands: what a spec may be, and how image folders are read.
DATA_HELP = ("image folder, WebDataset shards ('shards/{000..009}.tar'), or 'fmnist[:DIR]'; "
             + IMAGE_CACHE_HELP + "; " + HUGE_IMAGES_HELP)


def build_image_dataset(spec: str, image_size: int, channels: int, split: str = "train",
                        augment: bool = False, resize_mode: str = "crop", **kwargs: Any) -> Dataset:
    """A dataset from a spec: an image folder, a ``.tar`` shard pattern (``shards/{000..009}.tar``), or
    ``fmnist`` / ``fmnist:/dir`` (Fashion-MNIST IDX files). ``resize_mode`` fits non-square images to the
    square: "crop" (centre crop) or "pad" (letterbox with the edge pixels), see ``rqvae.data.images``;
    Fashion-MNIST is square already. Extra keyword arguments go to the dataset class (``eager_scan_limit``
    and ``cache``, the decoded-image cache: on unless ``$RQVAE_IMAGE_CACHE`` is 0, see
    :mod:`rqvae.data.decoded`, for folders; ``shuffle_buffer``, ``num_classes``, ``seed`` for shards)."""
    spec = str(spec)
    check_resize_mode(resize_mode)
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = spec.split(":", 1)[1] if ":" in spec else FMNIST_DIR
        return FashionMNIST(root or FMNIST_DIR, image_size, channels, split=split, augment=augment)
    if any(part.endswith(".tar") or part.endswith(".tar}") for part in spec.split("::")) or (
            "{" in spec and ".tar" in spec):
        return WebImageDataset(spec, image_size, channels, augment=augment, resize_mode=resize_mode, **kwargs)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"dataset {spec} does not exist; pass an image folder, a .tar shard pattern "
                        "(shards/{000..009}.tar) or 'fmnist'")
    if not path.is_dir():
        raise UserError(f"dataset {spec} is a file; pass a folder of images, a .tar shard pattern "
                        "or 'fmnist'")
    return ImageFolderDataset(path, image_size, channels, split=split, augment=augment,
                              resize_mode=resize_mode, **kwargs)
