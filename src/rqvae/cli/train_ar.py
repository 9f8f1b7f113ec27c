"""``rqvae train-ar``: train an RQ-Transformer on the codes of a trained RQ-VAE (stage 2); also under
``torchrun -m rqvae train-ar``. The options are the fields of :class:`rqvae.train.ar.TrainARConfig`."""

from __future__ import annotations

import argparse

from rqvae.cli.common import add_training_arguments, run_training
from rqvae.train.ar import TrainARConfig, train_ar


def add_arguments(p: argparse.ArgumentParser) -> None:

    add_training_arguments(p, TrainARConfig)


def run(args: argparse.Namespace) -> int:

    run_training(TrainARConfig, args, train_ar)
    return 0
