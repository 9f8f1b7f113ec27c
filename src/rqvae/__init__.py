"""rqvae: RQ-VAE and RQ-Transformer (Lee et al., CVPR 2022) as a library and a command-line tool.

Heavy modules are imported lazily, so ``import rqvae`` and ``rqvae --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ResidualQuantizer": "rqvae.models.quantize",
    "QuantizerOutput": "rqvae.models.quantize",
    "RQVAE": "rqvae.models.vae",
    "RQVAEConfig": "rqvae.models.vae",
    "RQVAEOutput": "rqvae.models.vae",
    "VAE_PRESETS": "rqvae.models.vae",
    "RQTransformer": "rqvae.models.transformer",
    "RQTransformerConfig": "rqvae.models.transformer",
    "AR_PRESETS": "rqvae.models.transformer",
    "Classifier": "rqvae.models.classifier",
    "UserError": "rqvae.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rqvae' has no attribute {name!r}")
