"""Data: images on disk, datasets, loaders, the encoder-feature cache and captions."""

from rqvae.data.datasets import (  # noqa: F401  the package's public API
    EAGER_SCAN_LIMIT,
    FMNIST_CLASSES,
    FMNIST_DIR,
    WDS_IMAGE_KEYS,
    WDS_LABEL_KEYS,
    FashionMNIST,
    ImageFolderDataset,
    ResumableBatchSampler,
    TensorImageDataset,
    WebImageDataset,
    batches,
    build_image_dataset,
    collate,
    epoch_order,
    load_image,
    make_loader,
    steps_per_epoch,
)
