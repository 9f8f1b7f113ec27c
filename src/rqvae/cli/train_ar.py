"""``rqvae train-ar``: train an RQ-Transformer on the codes of a trained RQ-VAE (stage 2); also under
``torchrun -m rqvae train-ar``. The options are the fields of :class:`rqvae.train.ar.TrainARConfig`."""

from __future__ import annotations

import argparse

from rqvae.cli.common import add_training_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rqvae.train.ar import TrainARConfig

    add_training_arguments(p, TrainARConfig)


def run(args: argparse.Namespace) -> int:
    from rqvae.train.ar import TrainARConfig, train_ar

    run_training(TrainARConfig, args, train_ar)
    return 0
