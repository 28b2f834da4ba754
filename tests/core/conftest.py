"""Shared fixtures of the core tests."""

import pytest
import torch
import torch.nn.functional as F

from invdefend.data import natural_image_patches
from invdefend.models import LeNet, MLP, uniform_init_


@pytest.fixture(scope="session")
def lenet_case():
    """DLG's sigmoid LeNet at uniform init, one 32x32x3 natural patch and its label."""
    model = uniform_init_(LeNet(), generator=torch.Generator().manual_seed(0))
    x = natural_image_patches(1, seed=1)
    y = torch.tensor([3])
    return model, F.cross_entropy, x, y


@pytest.fixture(scope="session")
def mlp_bottom():
    """An MLP bottom model 3x16x16 -> 128-dim embedding, and two inputs."""
    torch.manual_seed(0)
    bottom = MLP(3 * 16 * 16, hidden=(256,), out_features=128, activation="tanh", final_activation=True)
    x = natural_image_patches(2, size=16, seed=2)
    return bottom, x
