"""Training task of the small evaluation classifier (:mod:`rqvae.models.classifier`).

AdamW, a short warm-up and cosine decay, label smoothing 0.05, on dict batches
{"image": (B, C, S, S) in [-1, 1], "label": (B,)}; float32 (bf16 convolutions are far slower than
float32 on CPU, measured). The loop is :class:`rqvae.train.trainer.Trainer`'s.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from rqvae.config import option
from rqvae.data import batches, collate
from rqvae.distributed import DistInfo
from rqvae.errors import UserError
from rqvae.models.classifier import Classifier, predict_logits
from rqvae.train.optim import build_optimizer, build_scheduler
from rqvae.train.task import TrainerConfig, TrainTask
from rqvae.train.trainer import Trainer

TAIL = 50  # the result's loss and accuracy are means over the last TAIL steps


@dataclass(kw_only=True)
class TrainClassifierConfig(TrainerConfig):
    data: str = option(help="image folder with one sub-folder per class, WebDataset shards, or "
                            "'fmnist[:DIR]'")
    run_dir: str = option(help="output folder: the model (config.json + model.safetensors) and its run "
                               "(checkpoints/, metrics.jsonl, tb/)", flag="--out")
    steps: int = option(2000, "optimizer steps (2000: 89.5% Fashion-MNIST test accuracy, measured)")
    batch_size: int = option(128, "images per process and micro-batch")
    lr: float = option(2e-3, "AdamW peak learning rate (cosine decay)")
    weight_decay: float = option(5e-4, "AdamW weight decay (matrices only)")
    image_size: int = option(32, "training image size (Fashion-MNIST: 32)")
    channels: int | None = option(None, "1 (grayscale) or 3 (RGB); default: 1 for fmnist, else 3",
                                  choices=(1, 3))
    width: int = option(32, "channels of the first stage")
    test_split: str = option("test", "split for the held-out accuracy (Fashion-MNIST: test; folders: a "
                                     "'test' sub-folder); 'none' to skip")
    flip: bool = option(True, "random horizontal flips")

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")


@dataclass
class TrainClassifierResult:
    steps: int
    final_loss: float  # mean training loss over the last 50 steps
    train_accuracy: float  # on the last 50 training batches
    test_accuracy: float | None  # on the held-out dataset, if one was given
    seconds: float


class ClassifierTask(TrainTask):
    """The classifier (optimizer "model"); its model is built by the caller."""

    name = "classifier"

    def __init__(self, cfg: TrainClassifierConfig, model: Classifier, dataset: Dataset,
                 eval_dataset: Dataset | None = None) -> None:
        self.cfg, self.model, self.dataset, self.eval_dataset = cfg, model, dataset, eval_dataset
        self.test_accuracy: float | None = None
        self.tail: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque(maxlen=TAIL)

    def build(self, info: DistInfo) -> None:
        cfg = self.cfg
        self.info, self.device = info, next(self.model.parameters()).device
        opt = build_optimizer(self.model, "adamw", lr=cfg.lr, betas=(0.9, 0.99),
                              weight_decay=cfg.weight_decay)
        self.modules, self.optimizers = {"model": self.model}, {"model": opt}
        self.schedulers = {"model": build_scheduler(opt, warmup_steps=min(100, cfg.steps // 10),
                                                    total_steps=cfg.steps, schedule="cosine")}
        self.model.train()

    def batches(self, start: int) -> Iterator[Any]:

        return batches(self.dataset, self.cfg.batch_size, seed=self.cfg.seed, start_step=start,
                       rank=self.info.rank, world_size=self.info.world_size)

    def train_step(self, batch: Any, *, step: int, micro: int, scale: float) -> dict[str, torch.Tensor]:
        num_classes = self.model.config.num_classes
        if int(batch["label"].max()) >= num_classes:  # a CPU tensor: no device sync
            raise UserError(f"the data has label {int(batch['label'].max())} but the classifier has "
                            f"{num_classes} classes; set num_classes to match the data")
        x = batch["image"].to(self.device)  # (B, C, S, S)
        y = batch["label"].to(self.device)  # (B,)
        logits = self.model(x)  # (B, K) fp32
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
        (loss * scale).backward()
        acc = (logits.detach().argmax(-1) == y).float().mean()
        self.tail.append((loss.detach(), acc))
        return {"loss/total": loss.detach(), "acc/train": acc}

    def validate(self, step: int) -> dict[str, float] | None:
        """The held-out accuracy, at the end of the run."""
        if self.eval_dataset is None or step < self.cfg.steps:
            return None
        self.test_accuracy = evaluate_dataset(self.model, self.eval_dataset)
        self.model.train()
        return {"acc/test": self.test_accuracy}

    def result(self, steps: int, seconds: float) -> TrainClassifierResult:
        if self.test_accuracy is None and self.eval_dataset is not None:  # resumed after the last step
            self.test_accuracy = evaluate_dataset(self.model, self.eval_dataset)
        losses, hits = (torch.stack(t).float().mean().item() for t in zip(*self.tail)) if self.tail \
            else (float("nan"), float("nan"))
        return TrainClassifierResult(steps=steps, final_loss=losses, train_accuracy=hits,
                                     test_accuracy=self.test_accuracy, seconds=seconds)


def train_classifier(model: Classifier, dataset: Dataset, steps: int, batch_size: int = 128,
                     lr: float = 2e-3, weight_decay: float = 5e-4, seed: int = 0,
                     eval_dataset: Dataset | None = None, run_dir: str | None = None,
                     progress: bool = True) -> TrainClassifierResult:
    """Train ``model`` in place (dict batches {"image", "label"}; ``rqvae.data`` datasets, ``augment=True``
    for horizontal flips). Logs to ``run_dir`` (metrics.jsonl + TensorBoard) when given; no checkpoints."""
    cfg = TrainClassifierConfig(data="(in memory)", run_dir=run_dir or "", steps=steps, batch_size=batch_size,
                                lr=lr, weight_decay=weight_decay, seed=seed, progress=progress,
                                checkpoint_every=0, device=str(next(model.parameters()).device.type))
    return fit_classifier(cfg, model, dataset, eval_dataset)


def fit_classifier(cfg: TrainClassifierConfig, model: Classifier, dataset: Dataset,
                   eval_dataset: Dataset | None = None) -> TrainClassifierResult:
    """Train ``model`` as ``cfg`` says (its ``run_dir`` holds the logs and checkpoints) and score it on
    ``eval_dataset`` when given."""
    task = ClassifierTask(cfg, model, dataset, eval_dataset)
    trainer = Trainer(cfg, task)
    t0 = time.perf_counter()
    trainer.train()
    model.eval()
    return task.result(trainer.step - trainer.start_step, time.perf_counter() - t0)


@torch.no_grad()
def evaluate_dataset(model: Classifier, dataset: Dataset, batch_size: int = 512) -> float:
    """Accuracy on a map-style dataset of {"image", "label"} items."""

    n = len(dataset)  # type: ignore[arg-type]
    correct = 0
    for i in range(0, n, batch_size):
        keys = list(range(i, min(n, i + batch_size)))
        getitems = getattr(dataset, "__getitems__", None)
        batch = collate(getitems(keys) if getitems else [dataset[k] for k in keys])
        pred = predict_logits(batch["image"], model, batch_size).argmax(-1)
        correct += int((pred == batch["label"]).sum())
    return correct / max(1, n)
