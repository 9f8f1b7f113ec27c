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
