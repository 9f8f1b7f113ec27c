"""``rqvae train-classifier``: train the small CNN used for rejection sampling and the in-domain
accuracy of class-conditional samples (``rqvae eval --accuracy``). The options are the fields of
:class:`rqvae.train.classifier.TrainClassifierConfig`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from rqvae import distributed
from rqvae.cli.common import add_training_arguments, run_training
from rqvae.data import build_image_dataset
from rqvae.errors import UserError
from rqvae.models.classifier import Classifier, ClassifierConfig
from rqvae.train.classifier import TrainClassifierConfig, fit_classifier


def add_arguments(p: argparse.ArgumentParser) -> None:

    add_training_arguments(p, TrainClassifierConfig)


def _datasets(cfg: Any, channels: int) -> tuple[Any, Any]:
    """The training set and the held-out set (None when there is no separate one)."""

    fmnist = cfg.data == "fmnist" or cfg.data.startswith("fmnist:")
    train = build_image_dataset(cfg.data, cfg.image_size, channels, split="train", augment=cfg.flip)
    num_classes = getattr(train, "num_classes", 0)
    if num_classes < 2:
        raise UserError(f"{cfg.data} has {num_classes} class(es); a classifier needs images in at least two "
                        "class sub-folders")
    if cfg.test_split == "none":
        return train, None
    try:
        test = build_image_dataset(cfg.data, cfg.image_size, channels, split=cfg.test_split)
    except UserError:
        return train, None
    same_root = Path(getattr(test, "root", "")) == Path(getattr(train, "root", ""))
    if not fmnist and same_root:
        return train, None  # a folder without a test split: the "test" set would be the training set
    return train, test


def _train(cfg: Any) -> int:


    fmnist = cfg.data == "fmnist" or cfg.data.startswith("fmnist:")
    channels = cfg.channels or (1 if fmnist else 3)
    train, test = _datasets(cfg, channels)
    torch.manual_seed(cfg.seed)
    model = Classifier(ClassifierConfig(in_channels=channels, num_classes=train.num_classes, width=cfg.width,
                                        image_size=cfg.image_size,
                                        class_names=tuple(getattr(train, "class_names", None) or ())))
    model.to(distributed.init_distributed(cfg.device).device)
    result = fit_classifier(cfg, model, train, test)
    out = Path(cfg.run_dir)
    if distributed.get_rank() != 0 or cfg.end_step() < cfg.steps:  # stopped early: the checkpoint is all
        return 0
    model.save_pretrained(out)
    summary = {"steps": result.steps, "final_loss": result.final_loss,
               "train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
               "seconds": result.seconds, "data": cfg.data}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    print(f"classifier saved to {out}: {result.steps} steps in {result.seconds:.0f} s, "
          f"train accuracy {result.train_accuracy:.4f}, test accuracy {acc}")
    return 0


def run(args: argparse.Namespace) -> int:

    return run_training(TrainClassifierConfig, args, _train)
