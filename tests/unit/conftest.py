"""Unit-test settings: one torch thread, because tiny models run slower with more."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Thread start-up costs more than tiny matrix products gain, and on a shared 2-core
    # machine two threads per process oversubscribe the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
