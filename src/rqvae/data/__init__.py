"""Data: images on disk, datasets, loaders, the caches and captions.

Every dataset yields ``{"image": FloatTensor (C, S, S) in [-1, 1], "label": int}``:

- :mod:`~rqvae.data.folder`: an image folder (recursive; class labels from first-level sub-folders),
- :mod:`~rqvae.data.webdataset`: WebDataset ``.tar`` shards, streamed,
- :mod:`~rqvae.data.fmnist`: Fashion-MNIST IDX files (``fmnist`` or ``fmnist:/dir``),
- :mod:`~rqvae.data.tensor`: a tensor held in memory.

:func:`build_image_dataset` picks one from a spec string; :mod:`~rqvae.data.loader` serves it in a
deterministic, resumable order.
"""

from rqvae.data.build import build_image_dataset
from rqvae.data.fmnist import FMNIST_CLASSES, FMNIST_DIR, FashionMNIST
from rqvae.data.folder import EAGER_SCAN_LIMIT, ImageFolderDataset
from rqvae.data.images import load_image
from rqvae.data.loader import (
    ResumableBatchSampler,
    batches,
    collate,
    epoch_order,
    make_loader,
    steps_per_epoch,
)
from rqvae.data.tensor import TensorImageDataset
from rqvae.data.webdataset import WDS_IMAGE_KEYS, WDS_LABEL_KEYS, WebImageDataset

__all__ = [
    "EAGER_SCAN_LIMIT", "FMNIST_CLASSES", "FMNIST_DIR", "WDS_IMAGE_KEYS", "WDS_LABEL_KEYS", "FashionMNIST",
    "ImageFolderDataset", "ResumableBatchSampler", "TensorImageDataset", "WebImageDataset", "batches",
    "build_image_dataset", "collate", "epoch_order", "load_image", "make_loader", "steps_per_epoch",
]
