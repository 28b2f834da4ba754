"""Tests for Inverting Gradients (invdefend.attacks.inverting_gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invdefend.attacks import inverting_gradients, model_gradient
from invdefend.data import load_digits_tensors
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_


def _case(i: int) -> tuple[LeNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_all, y_all = load_digits_tensors()
    net = uniform_init_(LeNet(in_channels=1, image_size=8), generator=torch.Generator().manual_seed(i))
    x, y = x_all[i : i + 1], y_all[i : i + 1]
    return net, x, y, model_gradient(net, x, y, F.cross_entropy)


def test_ig_reconstructs_digits_on_sigmoid_lenet() -> None:
    """Easy case: 8x8 digits, LeNet(sigmoid) at uniform init; measured 38-40 dB at 300 steps."""
    values = []
    for i in range(2):
        net, x, y, g = _case(i)
        r = inverting_gradients(net, g, input_shape=x.shape, labels=y, iterations=300, tv_weight=1e-4, seed=i)
        assert r.reconstruction.min() >= 0.0 and r.reconstruction.max() <= 1.0
        values.append(float(psnr(r.reconstruction, x)[0]))
    assert min(values) > 25.0


def test_ig_is_scale_invariant_and_infers_label() -> None:
    """Cosine matching: a gradient scaled by a learning rate gives the same reconstruction."""
    net, x, y, g = _case(2)
    a = inverting_gradients(net, g, input_shape=x.shape, iterations=60, seed=0)
    b = inverting_gradients(net, 0.01 * g, input_shape=x.shape, iterations=60, seed=0)
    assert torch.equal(a.label, y)  # labels=None: recovered with iDLG
    assert torch.allclose(a.reconstruction, b.reconstruction, atol=1e-4)


def test_ig_restarts_keep_the_best() -> None:
    net, x, y, g = _case(3)
    r = inverting_gradients(net, g, input_shape=x.shape, labels=y, iterations=30, restarts=3, seed=0)
    losses = r.info["restart_losses"]
    assert isinstance(losses, list) and len(losses) == 3
    assert len(set(losses)) == 3  # different random starts
    single = inverting_gradients(net, g, input_shape=x.shape, labels=y, iterations=30, seed=0)
    assert single.info["restart_losses"] == [losses[0]]  # restart 0 is the single-start run
    assert min(losses) <= losses[0]


def test_ig_errors() -> None:
    net, x, y, g = _case(0)
    with pytest.raises(ValueError, match="invdefend.attacks.inverting_gradients.*restarts"):
        inverting_gradients(net, g, input_shape=x.shape, labels=y, restarts=0)
    with pytest.raises(ValueError, match="batch of one"):
        inverting_gradients(net, g, input_shape=(2, 1, 8, 8))
