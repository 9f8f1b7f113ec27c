"""Inception-style score with any logits network (e.g. the in-domain classifier)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rqvae.errors import UserError
from rqvae.models.classifier import predict_logits


def inception_score(batches: Iterable[torch.Tensor], logits_net: nn.Module, splits: int = 10,
                    seed: int = 0) -> tuple[float, float]:
    """Inception-style score exp(E_x KL(p(y|x) || p(y))) (mean, std over ``splits`` splits) with any
    network returning class logits (torchmetrics' ``InceptionScore``). The splits are drawn with ``seed``."""
    from torchmetrics.image.inception import InceptionScore  # slow import (~1 s): only when scoring

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = InceptionScore(feature=logits_net, splits=splits)
    n = 0
    for x in batches:
        metric.update(x)
        n += x.shape[0]
    if n < splits:
        raise UserError(f"the score needs at least {splits} images (one per split), got {n}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class ClassifierLogits(nn.Module):
    """A :class:`~rqvae.models.classifier.Classifier` as a logits network for
    :func:`inception_score`: images in [-1, 1] of any size / channel count are adapted to the
    classifier's, then scored in eval mode."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.classifier.config
        if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
            images = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return predict_logits(images, self.classifier)
