"""``rqvae train-ar``: train an RQ-Transformer (stage 2) on a frozen RQ-VAE's codes; also under
``torchrun -m rqvae train-ar``."""

from __future__ import annotations

import argparse
import logging

from rqvae.cli.common import model_config_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="folder of the trained RQ-VAE (a train-vae run's model/)")
    p.add_argument("--data", required=True,
                   help="image folder, WebDataset shards ('shards/{000..009}.tar'), or 'fmnist[:DIR]'")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, model/, samples/, tb/")
    p.add_argument("--cond", choices=("class", "uncond", "text"), default="class",
                   help="condition: class labels (sub-folders / Fashion-MNIST labels), none, or captions")
    p.add_argument("--captions", default=None,
                   help="text models: a JSONL file of {\"file\": ..., \"text\": ...}; default: a .txt file "
                        "beside each image; 'classes': the class name of each image")
    p.add_argument("--tokenizer", default=None,
                   help="text models: a tokenizer.json (default: train byte-level BPE on the captions)")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per caption (padded/truncated)")
    p.add_argument("--text-vocab-size", type=int, default=16384, help="BPE vocabulary cap when training one")
    p.add_argument("--preset", default="fmnist-small",
                   help="RQ-Transformer preset (see rqvae.models.transformer)")
    p.add_argument("--model-config", default=None,
                   help="JSON file (or inline JSON object) of RQTransformerConfig fields over the preset")
    p.add_argument("--split", default="train", help="dataset split (Fashion-MNIST: train or test)")
    p.add_argument("--flip", action="store_true", help="also train on horizontally flipped images")
    p.add_argument("--feature-cache", default=None,
                   help="folder of cached encoder features (default: $RQVAE_CACHE or ~/.cache/rqvae)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after this step with a checkpoint (continue with --resume)")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: 5e-4 as official for the paper presets; 1e-3 for the "
                        "small CPU presets)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(500, steps / 20)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bf16 autocast)")
    p.add_argument("--temperature", type=float, default=0.5, help="tau of the soft labels (Sec. 3.2.3)")
    p.add_argument("--no-soft-labels", action="store_true", help="ablation: one-hot targets of the codes")
    p.add_argument("--no-stochastic", action="store_true", help="ablation: greedy codes as inputs")
    p.add_argument("--cond-dropout", type=float, default=None,
                   help="probability of the null condition, for classifier-free guidance "
                        "(default: the preset's cfg_dropout; fmnist-small 0.1)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=500, help="sample grids (0: only at the end)")
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many NaN steps in a row")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: CUDA if available")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-tensorboard", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rqvae import distributed
    from rqvae.train.ar import TrainARConfig, train_ar

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = TrainARConfig(
        vae=args.vae, data=args.data, run_dir=args.out, cond=args.cond, preset=args.preset,
        model=model_config_overrides(args.model_config, "RQTransformerConfig"), split=args.split,
        captions=args.captions,
        tokenizer=args.tokenizer, text_len=args.text_len, text_vocab_size=args.text_vocab_size,
        flip=args.flip,
        feature_cache=args.feature_cache, steps=args.steps, stop_after=args.stop_after,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, betas=tuple(args.betas), warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, bf16=not args.no_bf16, temperature=args.temperature,
        soft_labels=not args.no_soft_labels, stochastic=not args.no_stochastic,
        cond_dropout=args.cond_dropout, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
        log_every=args.log_every, sample_every=args.sample_every, samples_per_class=args.samples_per_class,
        seed=args.seed, resume=args.resume, max_nonfinite=args.max_nonfinite, device=args.device,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard,
    )
    try:
        train_ar(cfg)
    finally:
        distributed.cleanup()
    return 0
