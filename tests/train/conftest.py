"""Fixtures the training tests share."""

import pytest
import torch

from rqvae.models.vae import RQVAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A saved random `tiny` RQ-VAE (stage 2 tests train on its codes)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae") / "model"
    RQVAE.from_preset("tiny").save_pretrained(d)
    return d
