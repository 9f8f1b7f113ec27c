"""The demo's training recipe (``rqvae.demo.config.DemoConfig``, read at run time so that a change of the
demo's defaults reaches the benchmarks), as training configs for longer runs with a validation curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rqvae.demo.config import DemoConfig
from rqvae.train.ar import TrainARConfig
from rqvae.train.vae import TrainVAEConfig

VAL_SPLIT = 0.02  # held-out fraction of the training data for the validation curves


def vae_recipe(demo: DemoConfig, steps: int, bf16: bool = False) -> str:
    """A short name of the stage-1 recipe: result rows keyed by it never mix with other recipes' rows
    (``:bf16`` marks runs that asked for bf16 autocast, which runs only where it is measured faster)."""
    precision = ":bf16" if bf16 or demo.bf16 else ""
    return (f"demo:{demo.vae_preset}:{steps}st:b{demo.vae_batch_size}:lr{demo.vae_lr:g}:cos"
            f":km{demo.vae_codebook_init}:gan{demo.vae_disc_weight:g}{precision}")


def vae_config(run: Path, *, data: str, steps: int, seed: int, overrides: dict[str, Any],
               progress: bool, bf16: bool = False) -> TrainVAEConfig:
    """Stage 1 as the demo trains it (no GAN unless the demo adds one, k-means codebook init, cosine lr),
    ``steps`` long, with validation every steps / 6 on a held-out 2% of the training images; ``bf16``
    asks for bf16 autocast (used where it is measured faster) even if the demo trains in float32."""
    demo = DemoConfig()
    return TrainVAEConfig(
        data=data, run_dir=str(run), preset=demo.vae_preset, model={**demo.vae_model, **overrides},
        image_size=demo.image_size, channels=demo.channels, batch_size=demo.vae_batch_size, steps=steps,
        bf16=bf16 or demo.bf16, lr=demo.vae_lr, schedule="cosine", disc_weight=demo.vae_disc_weight,
        disc_start=steps // 2, codebook_init_batches=demo.vae_codebook_init,
        checkpoint_every=max(1, steps // 6), log_every=max(1, min(50, steps // 20)), sample_every=0,
        seed=seed, val_split=VAL_SPLIT, val_every=max(1, steps // 6),
        resume=(run / "checkpoints").is_dir(), progress=progress, tensorboard=False,
    )


def ar_config(run: Path, *, vae_dir: Path, data: str, steps: int, seed: int, cache: Path,
              options: dict[str, Any], progress: bool) -> TrainARConfig:
    """Stage 2 (class-conditional) as the demo trains it, ``steps`` long, with a validation curve;
    ``options`` (TrainARConfig fields, e.g. soft_labels, temperature) override the demo's."""
    demo = DemoConfig()
    return TrainARConfig(
        vae=str(vae_dir), data=data, run_dir=str(run), cond="class", preset=demo.ar_preset,
        model=dict(demo.ar_model), steps=steps, batch_size=demo.ar_batch_size, lr=demo.ar_lr, bf16=demo.bf16,
        checkpoint_every=max(1, steps // 6), log_every=max(1, min(50, steps // 20)), sample_every=0,
        seed=seed, val_split=VAL_SPLIT, val_every=max(1, steps // 6),
        resume=(run / "checkpoints").is_dir(), feature_cache=str(cache), progress=progress,
        tensorboard=False, **{"temperature": demo.ar_temperature, **options},
    )
