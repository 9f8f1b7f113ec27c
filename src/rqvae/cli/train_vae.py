"""``rqvae train-vae``: train an RQ-VAE tokenizer (stage 1); also under ``torchrun -m rqvae train-vae``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rqvae.cli.common import model_config_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="image folder, WebDataset shards ('shards/{000..009}.tar'), or 'fmnist[:DIR]'")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, model/, metrics.jsonl, tb/")
    p.add_argument("--preset", default="fmnist32-8x8x4",
                   help="model preset (fmnist32-8x8x4, tiny, imagenet256-8x8x4, ffhq256-8x8x4)")
    p.add_argument("--model-config", default=None,
                   help="JSON file (or inline JSON object) of RQVAEConfig fields overriding the preset")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's image size")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: the preset's")
    p.add_argument("--augment", action="store_true", help="random crop + horizontal flip")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 4e-5 as official; 4e-4 fmnist32, 1e-3 tiny)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9))
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(500, steps / 20)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--disc-start", type=int, default=0, help="step at which the GAN loss starts")
    p.add_argument("--disc-weight", type=float, default=0.75, help="adversarial weight; 0 disables the GAN")
    p.add_argument("--disc-ndf", type=int, default=64)
    p.add_argument("--disc-layers", type=int, default=2)
    p.add_argument("--lpips-vgg", default=None, help="local torchvision VGG16 weights for LPIPS")
    p.add_argument("--lpips-heads", default=None, help="local LPIPS linear heads (lpips' vgg.pth)")
    p.add_argument("--perceptual-weight", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU with AMX, or CUDA)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=500, help="reconstruction grids (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many NaN steps in a row")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: CUDA if available")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-tensorboard", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rqvae import distributed
    from rqvae.train.vae import TrainVAEConfig, train_vae

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = TrainVAEConfig(
        data=args.data, run_dir=args.out, preset=args.preset,
        model=model_config_overrides(args.model_config, "RQVAEConfig"),
        image_size=args.image_size, channels=args.channels, augment=args.augment,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=args.lr,
        betas=tuple(args.betas), warmup_steps=args.warmup_steps, schedule=args.schedule,
        disc_start=args.disc_start, disc_weight=args.disc_weight, disc_ndf=args.disc_ndf,
        disc_layers=args.disc_layers, perceptual_weight=args.perceptual_weight, lpips_vgg=args.lpips_vgg,
        lpips_heads=args.lpips_heads, bf16=args.bf16, grad_clip=args.grad_clip, ema_decay=args.ema,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, log_every=args.log_every,
        sample_every=args.sample_every, seed=args.seed, resume=args.resume,
        max_nonfinite=args.max_nonfinite, num_workers=args.num_workers, device=args.device,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard,
    )
    try:
        train_vae(cfg)
    finally:
        distributed.cleanup()
    if distributed.get_rank() == 0:
        print(f"saved the model to {Path(args.out) / 'model'}")
    return 0
