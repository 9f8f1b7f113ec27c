"""``rqvae demo``: train an RQ-VAE, a classifier and a class-conditional RQ-Transformer, then report.
The options are the fields of :class:`rqvae.demo.config.DemoConfig`."""

from __future__ import annotations

import argparse

from rqvae.config import add_config_arguments, config_from_args
from rqvae.demo.config import DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from rqvae.demo.pipeline import run_demo  # torch and the trainers: start-up time of `rqvae demo --help`

    run_demo(config_from_args(DemoConfig, args))
    return 0
