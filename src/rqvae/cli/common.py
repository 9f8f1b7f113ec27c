"""What the training commands share: arguments generated from a config dataclass, and running a trainer
under torchrun (the process group is left on every exit path)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from rqvae import distributed
from rqvae.config import add_config_arguments, config_from_args


def add_training_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Every field of ``config_class`` as an option, plus ``--config FILE``."""
    add_config_arguments(parser, config_class)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a single process); readable before and after the process group."""
    return os.environ.get("RANK", "0") == "0"


def run_training(config_class: type, args: argparse.Namespace, train: Callable[[Any], Any]) -> Any:
    """Build the config from ``args`` (``--config`` file, then explicit flags) and call ``train(cfg)``.
    Under torchrun only rank 0 logs below ERROR, so that every message appears once."""

    level = logging.INFO if is_main_process() else logging.ERROR
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    cfg = config_from_args(config_class, args)
    try:
        return train(cfg)
    finally:
        distributed.cleanup()
