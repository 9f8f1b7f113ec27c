"""A classifier whose decisions on given images are chosen by the test (no training): the features of the
images are computed once and the linear head is solved by least squares to give each image a logit margin
of 10 for its chosen class. Scores of `rqvae eval --accuracy` then have a known exact value."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rqvae.models.classifier import Classifier, ClassifierConfig, predict_logits


def classifier_choosing(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        class_names: tuple[str, ...] = ()) -> Classifier:
    """A Classifier (width 8: 32 features, so up to 32 images) predicting ``labels`` for ``images``."""
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(in_channels=images.shape[1], num_classes=num_classes, width=8,
                                      image_size=images.shape[-1], class_names=class_names)).eval()
    with torch.no_grad():
        h = clf.features(images).mean(dim=(2, 3)).double()  # (N, 32)
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], dim=1)  # (N, 33) with a bias column
        target = 10.0 * F.one_hot(labels, num_classes).double()  # (N, K)
        w = torch.linalg.lstsq(h1, target, driver="gelsd").solution  # (33, K)
        clf.head.weight.copy_(w[:-1].T.float())
        clf.head.bias.copy_(w[-1].float())
    got = predict_logits(images, clf).argmax(1)
    assert torch.equal(got, labels), "the images' features are not independent enough to choose labels"
    return clf
