"""``rqvae demo``: train an RQ-VAE, a classifier and a class-conditional RQ-Transformer, then report."""

from __future__ import annotations

import argparse

from rqvae.demo.config import DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s); reruns reuse it")
    p.add_argument("--data", default=d.data,
                   help="'fmnist' (Debian package dataset-fashion-mnist) or a folder of images with one "
                        "sub-folder per class (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--channels", type=int, default=d.channels, choices=(1, 3))
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--ar-steps", type=int, default=d.ar_steps)
    p.add_argument("--classifier-steps", type=int, default=d.classifier_steps)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="generated images for FID and classifier accuracy; 0 skips them")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--inception", default=None, help="FID InceptionV3 TorchScript file (default: found)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rqvae.demo.pipeline import run_demo  # torch and the trainers: start-up time of the CLI

    cfg = DemoConfig(out=args.out, data=args.data, image_size=args.image_size, channels=args.channels,
                     vae_steps=args.vae_steps, ar_steps=args.ar_steps,
                     classifier_steps=args.classifier_steps, eval_samples=args.eval_samples,
                     top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                     cfg_scale=args.cfg_scale, inception=args.inception, seed=args.seed,
                     bf16=not args.no_bf16, progress=not args.no_progress)
    run_demo(cfg)
    return 0
