"""Shared settings of the defense tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each defense test on one intra-op thread (restored afterwards).

    The models here are tiny: a second thread buys nothing, and on a shared machine its spin-waiting made
    the per-batch Jacobians of the embedding tests 20x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
