"""Tests for invdefend.attacks._common: gradient layout, functional model copies, per-sample gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invdefend.attacks import (
    AttackResult,
    FunctionalModel,
    as_flat_gradient,
    flatten_gradients,
    model_gradient,
    per_sample_gradients,
    split_flat,
    total_variation,
)
from invdefend.models import MLP, LeNet


def _net() -> nn.Module:
    torch.manual_seed(0)
    return LeNet(in_channels=1, image_size=8, activation="sigmoid")


def _batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_model_gradient_matches_backward_and_leaves_model_alone() -> None:
    net = _net()
    x, y = _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    g = model_gradient(net, x, y, F.cross_entropy)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    F.cross_entropy(net(x), y).backward()
    expected = flatten_gradients([p.grad for p in net.parameters()])
    assert torch.allclose(g, expected, atol=1e-6)


def test_layout_skips_frozen_parameters_and_round_trips() -> None:
    net = MLP(64, hidden=(16,), out_features=10)
    net.net[1].weight.requires_grad_(False)
    x, y = _batch()
    g = model_gradient(net, x, y, F.cross_entropy)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert g.numel() == sum(p.numel() for p in trainable)
    pieces = split_flat(g, [p.shape for p in trainable])
    assert [t.shape for t in pieces] == [p.shape for p in trainable]
    assert torch.equal(as_flat_gradient(pieces, net), g)
    assert torch.equal(as_flat_gradient(g, net), g)


def test_as_flat_gradient_rejects_wrong_layout() -> None:
    net = _net()
    m = sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="invdefend.attacks.*trainable parameters"):
        as_flat_gradient(torch.zeros(m + 1), net)
    with pytest.raises(ValueError, match="must be flat"):
        as_flat_gradient(torch.zeros(2, m), net)
    with pytest.raises(ValueError, match="expected"):
        as_flat_gradient([torch.zeros(1)] * len(list(net.parameters())), net)


def test_per_sample_gradients_rows_and_mean() -> None:
    net = _net()
    x, y = _batch(4)
    rows = per_sample_gradients(net, x, y, F.cross_entropy)
    assert rows.shape == (4, sum(p.numel() for p in net.parameters()))
    for i in range(4):
        assert torch.allclose(rows[i], model_gradient(net, x[i : i + 1], y[i : i + 1], F.cross_entropy), atol=1e-6)
    assert torch.allclose(rows.mean(0), model_gradient(net, x, y, F.cross_entropy), atol=1e-6)


def test_functional_model_train_mode_keeps_buffers() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = _batch(5)
    y = y % 3
    before = net[2].running_mean.clone()
    fm = FunctionalModel(net, mode="train", dtype=torch.float64)
    g = fm.gradient(x.double(), y, F.cross_entropy, create_graph=False)
    assert g.dtype == torch.float64
    assert torch.equal(net[2].running_mean, before)
    assert net[1].weight.dtype == torch.float32  # the model itself was not cast
    with pytest.raises(ValueError, match="mode"):
        FunctionalModel(net, mode="inference")  # type: ignore[arg-type]


def test_total_variation_values() -> None:
    flat = torch.full((2, 1, 4, 4), 0.3)
    assert float(total_variation(flat)) == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0  # every horizontal neighbour pair differs by 1
    assert float(total_variation(stripes)) == pytest.approx(1.0)


def test_attack_result_final_loss() -> None:
    r = AttackResult(torch.zeros(1, 2), None, [3.0, 1.0], "x", 0.0)
    assert r.final_loss == 1.0
    assert torch.isnan(torch.tensor(AttackResult(torch.zeros(1), None, [], "x", 0.0).final_loss))
