"""Data tests keep every cache (decoded images, features, FID statistics) in a temporary folder of their own
(beside tmp_path, which the tests fill with image folders)."""

import pytest


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RQVAE_CACHE", str(tmp_path_factory.mktemp("rqvae-cache")))
