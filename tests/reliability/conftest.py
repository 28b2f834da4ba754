"""Tiny seeded models and batches shared by the reliability tests (CPU, a few ms per defended step)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from invdefend.models import MLP, uniform_init_

IN, HIDDEN, CLASSES, EMB = 12, 6, 3, 16


def make_classifier(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 12 -> 6 -> 3 tanh MLP (99 parameters), initialised from ``seed`` alone."""
    model = MLP(IN, hidden=(HIDDEN,), out_features=CLASSES, activation="tanh")
    return uniform_init_(model, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_bottom(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 12 -> 16 tanh bottom model of a split network, initialised from ``seed`` alone."""
    model = MLP(IN, hidden=(), out_features=EMB, activation="tanh", final_activation=True)
    return uniform_init_(model, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_batch(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs in [0, 1] shaped (n, 12) and their labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, IN, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)


def flat_grad(model: nn.Module) -> torch.Tensor:
    """The trainable parameters' ``.grad`` concatenated (zeros where None), as a fresh tensor."""
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).clone()
        for p in model.parameters()
        if p.requires_grad
    ]
    return torch.cat(parts)


@pytest.fixture(autouse=True)
def _quiet_torch_internal_deprecations():
    """torch's first forward-mode AD call compiles decompositions with torch.jit (a DeprecationWarning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (which cannot import conftest under importlib mode)."""
    return SimpleNamespace(
        make_classifier=make_classifier, make_bottom=make_bottom, make_batch=make_batch, flat_grad=flat_grad,
        IN=IN, CLASSES=CLASSES, EMB=EMB,
    )
