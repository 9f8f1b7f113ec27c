"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The test models are tiny: one thread avoids OpenMP hand-offs, which dominate their run time and
    stall badly when the (2-core) machine is shared. Subprocess tests set OMP_NUM_THREADS themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def cache_in_session_tmp(tmp_path_factory):
    """Every cache the code writes (decoded images, features, FID statistics) goes to a folder of this test
    session, never to ~/.cache, and never inside a test's image folder (which would look like a class)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RQVAE_CACHE", str(tmp_path_factory.mktemp("rqvae-session-cache")))
        yield
