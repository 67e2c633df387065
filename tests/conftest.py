"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tests run tiny kernels on a shared 2-core machine (2 xdist workers): OpenMP threads only
    # contend for the cores there, making small convolutions several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
