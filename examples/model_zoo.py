"""Model factories for ``invdefend assess`` (each returns an ``nn.Module``; call with no arguments).

    invdefend assess --model examples/model_zoo.py:lenet_digits --data digits
    invdefend assess --model examples/model_zoo.py:lenet_cifar --data sample-images -n 8
"""

import torch

from invdefend.models import LeNet, uniform_init_


def lenet_digits() -> torch.nn.Module:
    """A ReLU LeNet for scikit-learn's 8x8 digits (1 channel), seeded default initialisation."""
    torch.manual_seed(0)
    return LeNet(in_channels=1, image_size=8, activation="relu")


def lenet_cifar() -> torch.nn.Module:
    """DLG's sigmoid LeNet for 32x32 RGB inputs, uniform initialisation in [-0.5, 0.5]."""
    return uniform_init_(LeNet(), generator=torch.Generator().manual_seed(0))
