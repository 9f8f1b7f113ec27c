"""``rqvae train-vae``: train an RQ-VAE tokenizer (stage 1); also under ``torchrun -m rqvae train-vae``.
The options are the fields of :class:`rqvae.train.vae.TrainVAEConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rqvae.cli.common import add_training_arguments, is_main_process, run_training
from rqvae.train.vae import TrainVAEConfig, train_vae


def add_arguments(p: argparse.ArgumentParser) -> None:

    add_training_arguments(p, TrainVAEConfig)


def run(args: argparse.Namespace) -> int:

    cfg = run_training(TrainVAEConfig, args, lambda cfg: (train_vae(cfg), cfg)[1])
    run = Path(cfg.run_dir)
    if is_main_process() and (run / "model").is_dir():  # not after --stop-after
        last = f" (the best on the validation data; the final one: {run / 'model-last'})" \
            if (run / "model-last").is_dir() else ""
        print(f"saved the model to {run / 'model'}{last}")
    return 0
