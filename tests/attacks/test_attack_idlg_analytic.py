"""Tests for iDLG label recovery (invdefend.attacks.idlg) and the analytic linear-layer attack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invdefend.attacks import analytic_linear_attack, idlg_attack, idlg_label, model_gradient
from invdefend.data import load_digits_tensors, natural_image_patches
from invdefend.metrics import psnr
from invdefend.models import MLP, LeNet, uniform_init_


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_idlg_label_recovers_every_label(activation: str) -> None:
    x_all, y_all = load_digits_tensors()
    idx = torch.arange(0, 200, 20)  # 10 samples, labels 0..9 in varied order
    for i in idx.tolist():
        torch.manual_seed(i)
        net = LeNet(in_channels=1, image_size=8, activation=activation)
        x, y = x_all[i : i + 1], y_all[i : i + 1]
        g = model_gradient(net, x, y, F.cross_entropy)
        assert int(idlg_label(net, g)) == int(y)
        assert int(idlg_label(net, g, use_bias=False)) == int(y)  # weight-row rule


def test_idlg_label_on_layer_without_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10, bias=False))
    x_all, y_all = load_digits_tensors()
    for i in range(5):
        g = model_gradient(net, x_all[i : i + 1], y_all[i : i + 1], F.cross_entropy)
        assert int(idlg_label(net, g)) == int(y_all[i])


def test_idlg_attack_reconstructs() -> None:
    x_all, y_all = load_digits_tensors()
    net = uniform_init_(LeNet(in_channels=1, image_size=8), generator=torch.Generator().manual_seed(0))
    x, y = x_all[5:6], y_all[5:6]
    g = model_gradient(net, x, y, F.cross_entropy)
    r = idlg_attack(net, g, input_shape=x.shape, iterations=60, dtype=torch.float64, seed=0)
    assert r.attack == "idlg" and torch.equal(r.label, y)
    assert float(psnr(r.reconstruction, x)[0]) > 30.0
    with pytest.raises(ValueError, match="batch of one"):
        idlg_attack(net, g, input_shape=(2, 1, 8, 8))
    with pytest.raises(ValueError, match="labels are inferred"):
        idlg_attack(net, g, input_shape=x.shape, labels=y)


def test_analytic_attack_is_exact_on_mlp() -> None:
    torch.manual_seed(0)
    images = natural_image_patches(3, size=16)
    net = MLP(3 * 16 * 16, hidden=(64, 32), out_features=10, activation="relu")
    for i in range(3):
        x, y = images[i : i + 1], torch.tensor([i])
        g = model_gradient(net, x, y, F.cross_entropy)
        r = analytic_linear_attack(net, g, input_shape=x.shape)
        assert r.reconstruction.shape == x.shape
        assert float(psnr(r.reconstruction, x)[0]) > 60.0


def test_analytic_attack_errors() -> None:
    torch.manual_seed(0)
    net = MLP(64, hidden=(16,), out_features=10)
    x_all, y_all = load_digits_tensors()
    g = model_gradient(net, x_all[:1], y_all[:1], F.cross_entropy)
    with pytest.raises(ValueError, match="invdefend.attacks.analytic_linear_attack.*features"):
        analytic_linear_attack(net, g, input_shape=(1, 1, 4, 4))
    with pytest.raises(ValueError, match="batch of one"):
        analytic_linear_attack(net, g, input_shape=(2, 1, 8, 8))
    conv = LeNet(in_channels=1, image_size=8)
    gc = model_gradient(conv, x_all[:1], y_all[:1], F.cross_entropy)
    with pytest.raises(ValueError, match="flattened input"):
        analytic_linear_attack(conv, gc, input_shape=(1, 1, 8, 8))
