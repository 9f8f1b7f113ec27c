"""A small CNN image classifier, used to evaluate class-conditional samples.

The paper reports ImageNet results "with rejection sampling", where a pretrained classifier (ResNet-101)
scores each generated image and only the samples it finds most likely to be of their intended class
are kept (an acceptance rate such as 0.05 or 0.25). On Fashion-MNIST-sized data we use this small CNN
instead, for two things:

* :func:`rejection_sample` keeps the top ``keep_fraction`` of samples by p(y = intended class | x);
* :func:`classifier_accuracy` is the in-domain accuracy of class-conditional samples: how often the
  classifier's argmax equals the class the generator was asked for.

Architecture: three stages of (3x3 conv, BatchNorm, ReLU) x n with 2x2 max pooling between stages,
global average pooling, dropout and a linear head. Any image size works (pooling is global).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from rqvae.errors import UserError
from rqvae.models.hub import PretrainedMixin


@dataclass
class ClassifierConfig:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    num_classes: int = 10
    width: int = 32  # channels of the first stage; stages use width, 2*width, 4*width
    blocks_per_stage: int = 1
    dropout: float = 0.2
    image_size: int = 32  # the size it was trained at (inputs of other sizes still work)
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        problems = []
        if self.in_channels not in (1, 3):
            problems.append(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 2:
            problems.append(f"num_classes must be at least 2, got {self.num_classes}")
        if self.width < 1 or self.blocks_per_stage < 1:
            problems.append("width and blocks_per_stage must be positive")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if problems:
            raise UserError("invalid ClassifierConfig: " + "; ".join(problems))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Classifier(nn.Module, PretrainedMixin):
    """images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""

    config_class = ClassifierConfig
    model_type = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = config.in_channels
        for stage in range(3):
            cout = config.width * 2**stage
            for _ in range(config.blocks_per_stage):
                layers.append(_conv_block(cin, cout))
                cin = cout
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(cin, config.num_classes)

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise UserError(f"the classifier takes images of shape (B, {c}, H, W), got "
                            f"{tuple(images.shape)}; it was trained on {'RGB' if c == 3 else 'grayscale'} "
                            "images")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        h = self.features(images)  # (B, 4w, H/4, W/4)
        h = h.mean(dim=(2, 3))  # (B, 4w) global average pooling
        return self.head(self.dropout(h))  # (B, num_classes)


# ------------------------------------------------------------------------------------------ inference
def _adapt_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale <-> RGB so that samples from a model of the other kind can still be scored."""
    if images.ndim == 4 and images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            return images.expand(-1, 3, -1, -1)
        if images.shape[1] == 3 and channels == 1:
            return images.mean(dim=1, keepdim=True)
    return images


@torch.no_grad()
def predict_logits(images: torch.Tensor, classifier: Classifier, batch_size: int = 256) -> torch.Tensor:
    """images (N, C, H, W) in [-1, 1] -> logits (N, num_classes), in eval mode, batched."""
    if images.ndim != 4:
        raise UserError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    images = _adapt_channels(images, classifier.config.in_channels)
    out = [classifier(images[i:i + batch_size].to(device).float()).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, classifier.config.num_classes)


def _check_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels; give one label per image")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"labels must be class ids in [0, {num_classes}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}]; is this the right classifier?")
    return labels


def intended_class_probability(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                               batch_size: int = 256) -> torch.Tensor:
    """p(y = labels[i] | images[i]) under the classifier, shape (N,)."""
    labels = _check_labels(images, labels, classifier.config.num_classes)
    probs = predict_logits(images, classifier, batch_size).softmax(dim=-1)  # (N, K)
    return probs.gather(1, labels[:, None]).squeeze(1)


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                        batch_size: int = 256) -> float:
    """Fraction of images whose predicted class equals the label (for samples: the class asked for)."""
    labels = _check_labels(images, labels, classifier.config.num_classes)
    if labels.numel() == 0:
        raise UserError("no images to score")
    pred = predict_logits(images, classifier, batch_size).argmax(dim=-1)
    return float((pred == labels).float().mean())


class RejectionSample(NamedTuple):
    images: torch.Tensor  # (M, C, H, W) the kept samples, best first
    labels: torch.Tensor  # (M,)
    indices: torch.Tensor  # (M,) their positions in the input
    scores: torch.Tensor  # (M,) p(intended class | image)


def rejection_sample(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                     keep_fraction: float, per_class: bool = False, batch_size: int = 256) -> RejectionSample:
    """Keep the ``keep_fraction`` of samples with the highest p(intended class | image).

    ``round(keep_fraction * N)`` samples are kept (at least one). With ``per_class``, that fraction is
    kept within each class separately, so the kept set stays class-balanced. Ties break towards the
    lower index.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise UserError(f"keep_fraction must be in (0, 1], got {keep_fraction}; e.g. 0.25 keeps a quarter")
    scores = intended_class_probability(images, labels, classifier, batch_size)  # (N,)
    labels = torch.as_tensor(labels).long().reshape(-1)
    n = scores.shape[0]
    if n == 0:
        raise UserError("no images to score")
    groups = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique()] if per_class else [
        torch.arange(n)]
    kept = []
    for idx in groups:
        k = max(1, int(math.floor(keep_fraction * idx.numel() + 0.5)))
        # stable sort on -score: equal scores keep index order
        order = torch.sort(-scores[idx].double(), stable=True).indices[:k]
        kept.append(idx[order])
    keep = torch.cat(kept)
    keep = keep[torch.sort(-scores[keep].double(), stable=True).indices]  # best first overall
    return RejectionSample(images[keep], labels[keep], keep, scores[keep])
