"""Old home of the trainers' shared pieces, split by job in issue 9: :mod:`~rqvae.train.optim`,
:mod:`~rqvae.train.ema`, :mod:`~rqvae.train.guard`, :mod:`~rqvae.train.precision` and
:mod:`~rqvae.train.logger`. These re-exports remain until every caller imports from those modules."""

from rqvae.train.ema import ModelEMA
from rqvae.train.guard import NonFiniteGuard, NonFiniteLossError
from rqvae.train.logger import Logger
from rqvae.train.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor, param_groups
from rqvae.train.precision import autocast, bf16_is_fast

__all__ = ["Logger", "ModelEMA", "NonFiniteGuard", "NonFiniteLossError", "autocast", "bf16_is_fast",
           "build_optimizer", "build_scheduler", "clip_grad_norm", "lr_factor", "param_groups"]
