"""Small float64 problems and gradient helpers shared by the tests (on ``pythonpath`` via setup.cfg)."""

from __future__ import annotations

import torch
from torch import nn

from invdefend.models import MLP


def make_problem(seed: int = 0, batch: int = 6, d: int = 12, classes: int = 3):
    """A float64 tanh MLP (one hidden layer of 8; m = 131 parameters at the defaults) and a seeded batch."""
    torch.manual_seed(seed)
    model = MLP(d, hidden=(8,), out_features=classes, activation="tanh").double()
    x = torch.rand(batch, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    return model, nn.CrossEntropyLoss(), x, y


def digit_case():
    """The attack tests' small case: the float64 digits ``(x_all, y_all)``, a sigmoid MLP (64 → 8 → 10) built
    after ``torch.manual_seed(0)``, the first digit ``(x, y)`` and its gradient ``g``."""
    from invdefend.attacks import model_gradient
    from invdefend.data import load_digits_tensors

    x_all, y_all = load_digits_tensors(torch.float64)
    torch.manual_seed(0)
    net = MLP(64, hidden=(8,), out_features=10, activation="sigmoid").double()
    x, y = x_all[:1], y_all[:1]
    return x_all, y_all, net, x, y, model_gradient(net, x, y, nn.functional.cross_entropy)


def flat_grad(model: nn.Module) -> torch.Tensor:
    """A copy of the model's gradients, flattened in parameter order."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def set_grad(model: nn.Module, g: torch.Tensor) -> None:
    """Write the flat gradient ``g`` into the model's ``.grad`` (copies)."""
    offset = 0
    for p in model.parameters():
        p.grad = g[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
