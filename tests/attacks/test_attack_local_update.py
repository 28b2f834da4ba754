"""The local-update attack on a FedAvg client's update, and the bound the defense rests on for FedAvg: the
update is computed from the protected releases only, so an attack on it does no better than an attack that
sees every release (docs/theory.md §10.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from recording import RecordingSGD
from torch import nn

from invdefend import GradientDefense
from invdefend.attacks import (
    local_update_attack,
    multi_release_gradient_attack,
    simulate_local_update,
)
from invdefend.data import natural_image_patches
from invdefend.metrics import psnr
from invdefend.models import LeNet

STEPS, LR, SHAPE = 4, 0.1, (1, 3, 16, 16)


def _problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = LeNet(in_channels=3, image_size=16, num_classes=10, activation="sigmoid")
    return model, natural_image_patches(1, size=16, seed=seed).contiguous(), torch.tensor([seed % 10])


def test_simulated_update_is_what_sgd_does():
    model, x, y = _problem(0)
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(client(x), y).backward()
        opt.step()
    expected = torch.cat([(a - b).detach().reshape(-1) for a, b in zip(client.parameters(), model.parameters())])
    torch.testing.assert_close(simulate_local_update(model, x, y, steps=STEPS, lr=LR), expected, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
    model, _, y = _problem(0)
    with pytest.raises(ValueError, match="has 3 entries but the model"):
        local_update_attack(model, torch.zeros(3), input_shape=SHAPE, labels=y, steps=STEPS, lr=LR)
    with pytest.raises(ValueError, match="noise_variance=-1"):
        local_update_attack(model, torch.zeros(3), input_shape=SHAPE, labels=y, steps=STEPS, lr=LR, noise_variance=-1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_update_carries_no_more_than_its_releases(seed: int):
    model, x, y = _problem(seed)
    # undefended: the attack on the update is real
    clean = simulate_local_update(model, x, y, steps=STEPS, lr=LR)
    undefended = float(psnr(local_update_attack(model, clean, input_shape=SHAPE, labels=y, steps=STEPS, lr=LR,
                                                iterations=400, seed=seed).reconstruction, x))
    assert undefended >= 40.0
    # defended: every local step released under isotropic noise of relative energy 0.01
    client, criterion = copy.deepcopy(model), nn.CrossEntropyLoss()
    defense = GradientDefense(client, criterion, mechanism="isotropic", budget=0.01, prior=None, seed=100 + seed)
    inner = RecordingSGD(client.parameters(), lr=LR)
    releases = []
    opt = defense.wrap(inner)
    models, laws = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        criterion(client(x), y).backward()
        models.append(copy.deepcopy(client))
        opt.step()
        releases.append(inner.flat(-1))
        laws.append(defense.noise_law())
    update = torch.cat([(a - b).detach().reshape(-1) for a, b in zip(client.parameters(), model.parameters())])
    torch.testing.assert_close(update, -LR * torch.stack(releases).sum(0), rtol=1e-4, atol=1e-7)  # post-processing
    variance = LR**2 * sum(float(law.sigma2_iso) for law in laws)
    on_update = float(psnr(local_update_attack(model, update, input_shape=SHAPE, labels=y, steps=STEPS, lr=LR,
                                               noise_variance=variance, iterations=400, seed=seed).reconstruction, x))
    on_releases = float(psnr(multi_release_gradient_attack(models, releases, noise=laws, input_shape=SHAPE,
                                                           labels=y, iterations=500, seed=seed).reconstruction, x))
    assert on_update <= on_releases + 1.0, (on_update, on_releases)
    assert on_update <= undefended - 20.0, (on_update, undefended)
