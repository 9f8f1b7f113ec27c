"""The demo's training stages, each skipped when its output exists and resumed when interrupted, and the
class-conditional sampling they feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rqvae.data.build import build_image_dataset
from rqvae.demo.config import DemoConfig
from rqvae.models.classifier import Classifier, ClassifierConfig
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.classifier import evaluate_dataset, train_classifier
from rqvae.train.vae import TrainVAEConfig, train_vae


def done(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def _reuse(folder: Path, cls: Any, what: str) -> Any:
    """The model saved in ``folder`` by an earlier run, or None when there is none yet."""
    if not done(folder):
        return None
    print(f"reusing the {what} in {folder}")
    return cls.from_pretrained(folder)


def train_or_load_vae(cfg: DemoConfig, out: Path) -> Any:
    run = out / "vae"
    if (model := _reuse(run / "model", RQVAE, "RQ-VAE")) is not None:
        return model
    tcfg = TrainVAEConfig(
        data=cfg.data, run_dir=str(run), preset=cfg.vae_preset, model=dict(cfg.vae_model),
        image_size=cfg.image_size, channels=cfg.channels, batch_size=cfg.vae_batch_size,
        steps=cfg.vae_steps, bf16=cfg.bf16, lr=cfg.vae_lr, schedule="cosine",
        disc_weight=cfg.vae_disc_weight, disc_start=cfg.vae_steps // 2,
        codebook_init_batches=cfg.vae_codebook_init,
        checkpoint_every=max(1, cfg.vae_steps // 4),
        log_every=max(1, min(50, cfg.vae_steps // 20)), sample_every=0, seed=cfg.seed,
        resume=(run / "checkpoints").is_dir(), progress=cfg.progress, tensorboard=True,
    )
    return train_vae(tcfg)


def train_or_load_classifier(cfg: DemoConfig, out: Path, evaluate: bool = True) -> tuple[Any, float | None]:
    """The classifier (trained and saved to OUT/classifier unless it is there) and, with ``evaluate``, its
    accuracy on the test split."""
    folder = out / "classifier"
    model = _reuse(folder, Classifier, "classifier")
    if model is None:
        train = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="train", augment=True)
        torch.manual_seed(cfg.seed)
        model = Classifier(ClassifierConfig(
            in_channels=cfg.channels, num_classes=train.num_classes, width=cfg.classifier_width,
            blocks_per_stage=cfg.classifier_blocks, image_size=cfg.image_size,
            class_names=tuple(train.class_names)))
        train_classifier(model, train, steps=cfg.classifier_steps, batch_size=cfg.classifier_batch_size,
                         lr=cfg.classifier_lr, seed=cfg.seed, progress=cfg.progress,
                         run_dir=str(folder / "run"))
        model.save_pretrained(folder)
    if not evaluate:
        return model.eval(), None
    test = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="test")
    return model.eval(), evaluate_dataset(model, test)


def train_or_load_ar(cfg: DemoConfig, out: Path) -> Any:
    run = out / "ar"
    if (model := _reuse(run / "model", RQTransformer, "RQ-Transformer")) is not None:
        return model
    tcfg = TrainARConfig(
        vae=str(out / "vae" / "model"), data=cfg.data, run_dir=str(run), cond="class",
        preset=cfg.ar_preset, model=dict(cfg.ar_model), steps=cfg.ar_steps, batch_size=cfg.ar_batch_size,
        lr=cfg.ar_lr, soft_labels=cfg.ar_soft_labels, stochastic=cfg.ar_stochastic,
        temperature=cfg.ar_temperature,
        bf16=cfg.bf16, checkpoint_every=max(1, cfg.ar_steps // 4),
        log_every=max(1, min(50, cfg.ar_steps // 20)),
        sample_every=0, seed=cfg.seed, resume=(run / "checkpoints").is_dir(), progress=cfg.progress,
        feature_cache=str(out / "cache"), tensorboard=True,
    )
    return train_ar(tcfg)


@torch.no_grad()
def generate_images(ar: Any, vae: Any, labels: torch.Tensor, cfg: DemoConfig, batch_size: int = 100
                    ) -> torch.Tensor:
    """Class-conditional samples decoded to images (N, C, S, S) in [-1, 1]."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for i in range(0, len(labels), batch_size):
        codes = ar.generate(labels[i:i + batch_size], temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, cfg_scale=cfg.cfg_scale, generator=g)
        out.append(vae.decode(codes).clamp(-1, 1))
    return torch.cat(out)
