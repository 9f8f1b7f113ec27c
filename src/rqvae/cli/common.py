"""What the training commands share: arguments generated from a config dataclass, and running a trainer
under torchrun (the process group is left on every exit path)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from rqvae import distributed
from rqvae.config import add_config_arguments, config_from_args


def add_training_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Every field of ``config_class`` as an option, plus ``--config FILE``."""
    add_config_arguments(parser, config_class)


def run_training(config_class: type, args: argparse.Namespace, train: Callable[[Any], Any]) -> Any:
    """Build the config from ``args`` (``--config`` file, then explicit flags) and call ``train(cfg)``."""

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = config_from_args(config_class, args)
    try:
        return train(cfg)
    finally:
        distributed.cleanup()
