"""The small classifier: training on a separable toy set, rejection sampling, accuracy, save/load, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.classifier import (
    Classifier,
    ClassifierConfig,
    classifier_accuracy,
    intended_class_probability,
    rejection_sample,
)
from rqvae.train.classifier import train_classifier


def toy_set(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes: a bright top half, a bright bottom half, or a bright left half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    x = torch.full((n, 1, size, size), -0.6)
    h = size // 2
    x[labels == 0, :, :h, :] = 0.6
    x[labels == 1, :, h:, :] = 0.6
    x[labels == 2, :, :, :h] = 0.6
    x = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


@pytest.fixture(scope="module")
def trained() -> Classifier:
    torch.manual_seed(0)
    x, y = toy_set(256, seed=0)
    model = Classifier(ClassifierConfig(in_channels=1, num_classes=3, width=8, image_size=16,
                                        class_names=("top", "bottom", "left")))
    result = train_classifier(model, TensorImageDataset(x, y), steps=40, batch_size=32, lr=3e-3,
                              progress=False)
    assert result.steps == 40 and result.final_loss < 1.0
    return model


def test_training_beats_chance(trained):
    x, y = toy_set(120, seed=1)  # held out
    acc = classifier_accuracy(x, y, trained)
    assert acc > 0.9, acc  # chance is 1/3
    wrong = (y + 1) % 3  # asking for the wrong class: the accuracy of such "samples" collapses
    assert classifier_accuracy(x, wrong, trained) < 0.1


def test_rejection_sampling_keeps_exactly_the_top_fraction(trained):
    x, y = toy_set(40, seed=2)
    y = y.clone()
    y[:10] = (y[:10] + 1) % 3  # ten samples of the "wrong" class score low
    scores = intended_class_probability(x, y, trained)
    kept = rejection_sample(x, y, trained, keep_fraction=0.25)
    assert kept.indices.numel() == 10
    top = torch.sort(scores, descending=True, stable=True).indices[:10]
    assert set(kept.indices.tolist()) == set(top.tolist())
    assert torch.all(kept.scores[:-1] >= kept.scores[1:])  # best first
    assert kept.scores.min() >= scores[[i for i in range(40) if i not in set(top.tolist())]].max()
    assert torch.equal(kept.images, x[kept.indices]) and torch.equal(kept.labels, y[kept.indices])
    assert not set(kept.indices.tolist()) & set(range(10))  # none of the mislabelled ones survive
    # per class: the same fraction within each class
    per = rejection_sample(x, y, trained, keep_fraction=0.5, per_class=True)
    for c in y.unique():
        n_c = int((y == c).sum())
        assert int((per.labels == c).sum()) == max(1, int(n_c * 0.5 + 0.5))
    assert rejection_sample(x, y, trained, keep_fraction=1.0).indices.numel() == 40
    with pytest.raises(UserError, match="keep_fraction"):
        rejection_sample(x, y, trained, keep_fraction=0.0)
    with pytest.raises(UserError, match="class ids"):
        rejection_sample(x, torch.full((40,), 7), trained, keep_fraction=0.5)
    with pytest.raises(UserError, match="labels"):
        classifier_accuracy(x, y[:5], trained)


def test_save_and_load(trained, tmp_path):
    trained.save_pretrained(tmp_path / "clf")
    back = Classifier.from_pretrained(tmp_path / "clf")
    assert back.config == trained.config and back.config.class_names == ("top", "bottom", "left")
    x, _ = toy_set(8, seed=3)
    trained.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), trained(x))
    from rqvae.models.vae import RQVAE

    with pytest.raises(UserError, match="holds a 'classifier' model"):
        RQVAE.from_pretrained(tmp_path / "clf")
    with pytest.raises(UserError, match="grayscale"):
        back(torch.zeros(2, 3, 16, 16))


def test_cli_train_classifier(tmp_path, capsys):
    data = tmp_path / "data"
    x, y = toy_set(24, seed=4)
    for i, (img, lab) in enumerate(zip(x, y)):
        d = data / ["top", "bottom", "left"][int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        arr = ((img[0] + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
    out = tmp_path / "clf"
    assert main(["train-classifier", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--batch-size", "8", "--image-size", "16", "--channels", "1", "--width", "4",
                 "--no-progress"]) == 0
    model = Classifier.from_pretrained(out)
    assert model.config.num_classes == 3 and model.config.class_names == ("bottom", "left", "top")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_accuracy"] is None  # no test split in that folder
    assert "classifier saved" in capsys.readouterr().out
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.fromarray(((x[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()).save(one / "only" / "a.png")
    assert main(["train-classifier", "--data", str(one), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "at least two" in capsys.readouterr().err
