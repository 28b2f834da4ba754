"""Tests for the multi-release attacker (invdefend.attacks.multi_release): real reconstructions of a small
target whose model moves between releases, more releases reconstructing better, and its contracts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_problems import digit_case

from invdefend.attacks import NoiseCovariance, defense_aware_gradient_attack, model_gradient
from invdefend.attacks.multi_release import multi_release_gradient_attack
from invdefend.data import load_digits_tensors
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_

D64 = torch.float64


def _rounds(seed: int, rounds: int, energy: float) -> tuple[list, list, list, torch.Tensor, torch.Tensor]:
    """A sigmoid LeNet on one 8x8 digit, released ``rounds`` times with isotropic noise of relative energy
    ``energy`` and fresh draws, the model taking one SGD step on other digits between releases."""
    x_all, y_all = load_digits_tensors(D64)
    net = uniform_init_(LeNet(in_channels=1, image_size=8), generator=torch.Generator().manual_seed(seed)).double()
    x, y = x_all[seed : seed + 1], y_all[seed : seed + 1]
    others_x, others_y = x_all[100:164], y_all[100:164]
    gen = torch.Generator().manual_seed(10 + seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    models, releases, noises = [], [], []
    for _ in range(rounds):
        snapshot = copy.deepcopy(net)
        g = model_gradient(snapshot, x, y, F.cross_entropy)
        cov = NoiseCovariance(energy * float(g.pow(2).sum()) / g.numel())
        models.append(snapshot)
        releases.append(g + cov.sigma2_iso**0.5 * torch.randn(g.numel(), generator=gen, dtype=D64))
        noises.append(cov)
        pick = torch.randint(0, 64, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(others_x[pick]), others_y[pick]).backward()
        opt.step()
    return models, releases, noises, x, y


def test_more_releases_reconstruct_better_on_a_moving_model() -> None:
    """Relative noise energy 0.1 per release, model moving between rounds. Measured (samples 0-2): one
    release 12.3-14.5 dB, six releases 18.4-21.9 dB (+6.1 to +7.3 dB; 10·log10 6 = 7.8 dB)."""
    gains = []
    for seed in (0, 1):
        models, releases, noises, x, y = _rounds(seed, 6, 0.1)
        moved = sum(float((a - b).detach().pow(2).sum())
                    for a, b in zip(models[0].parameters(), models[-1].parameters()))
        assert moved > 1e-2  # the model really moved: each round is matched against its own weights
        opts = dict(input_shape=x.shape, labels=y, iterations=150, seed=0)
        one = multi_release_gradient_attack(models[:1], releases[:1], noise=noises[:1], **opts)
        many = multi_release_gradient_attack(models, releases, noise=noises, **opts)
        assert many.info == {"releases": 6, "models": 6} and one.info["releases"] == 1
        assert many.attack == "multi_release_gradient" and torch.equal(many.label, y)
        p_one, p_many = float(psnr(one.reconstruction, x)[0]), float(psnr(many.reconstruction, x)[0])
        assert p_one > 10.0  # a real reconstruction, not the prior mean (10.8 dB)
        gains.append(p_many - p_one)
    assert min(gains) > 3.0 and sum(gains) / len(gains) > 5.0, gains


def test_one_model_is_the_defense_aware_attack_on_the_mean() -> None:
    """With one model and one Σ the objective is the mean-release objective plus a constant."""
    models, releases, noises, x, y = _rounds(3, 3, 0.05)
    opts = dict(input_shape=x.shape, labels=y, iterations=40, seed=1)
    ours = multi_release_gradient_attack(models[0], torch.stack(releases), noise=noises[0], **opts)
    theirs = defense_aware_gradient_attack(models[0], releases, noise=noises[0], **opts)
    assert ours.info == {"releases": 3, "models": 1}
    torch.testing.assert_close(ours.reconstruction, theirs.reconstruction, atol=1e-4, rtol=0)


def test_priors_are_added_and_checked() -> None:
    _, _, net, x, y, g = digit_case()
    cov = NoiseCovariance(1e-4)
    opts = dict(noise=cov, input_shape=x.shape, labels=y, iterations=10, seed=0)

    class Calls:
        """A duck-typed prior: anything with neg_log_density."""

        n = 0

        def neg_log_density(self, xx: torch.Tensor) -> torch.Tensor:
            Calls.n += 1
            return 0.5 * (xx - 0.5).pow(2).flatten(1).sum(1) * 12.0

    with_prior = multi_release_gradient_attack(net, [g, g], prior=Calls(), **opts)
    iid = multi_release_gradient_attack(net, [g, g], **opts)
    assert Calls.n > 0
    torch.testing.assert_close(with_prior.reconstruction, iid.reconstruction)  # the same prior, written twice
    tv = multi_release_gradient_attack(net, [g], tv_weight=0.1, prior_var=None, **opts)
    adam = multi_release_gradient_attack(net, [g], optimizer="adam", **{**opts, "iterations": 5})
    assert len(adam.loss_history) == 5 and bool((adam.reconstruction >= 0).all())
    assert tv.reconstruction.shape == x.shape
    full = multi_release_gradient_attack(net, [g], **{**opts, "iterations": 200})
    early = multi_release_gradient_attack(net, [g], rel_tol=1e-3, **{**opts, "iterations": 200})
    assert len(early.loss_history) < len(full.loss_history)
    assert early.loss_history[-1] <= 1.01 * full.loss_history[-1]
    start = torch.full(x.shape, 0.5, dtype=D64)
    assert multi_release_gradient_attack(net, [g], init=start, **opts).reconstruction.shape == x.shape
    with pytest.raises(ValueError, match="prior= and prior_var="):
        multi_release_gradient_attack(net, [g], prior=Calls(), prior_var=0.1, **opts)
    with pytest.raises(ValueError, match="neg_log_density"):
        multi_release_gradient_attack(net, [g], prior=object(), **opts)
    with pytest.raises(ValueError, match="prior_var=-1"):
        multi_release_gradient_attack(net, [g], prior_var=-1.0, **opts)


def test_inputs_are_checked() -> None:
    _, _, net, x, y, g = digit_case()
    cov = NoiseCovariance(1e-4)
    opts = dict(input_shape=x.shape, labels=y, iterations=5)
    where = "invdefend.attacks.multi_release_gradient_attack"
    with pytest.raises(ValueError, match=f"{where}: 2 models for 3 releases"):
        multi_release_gradient_attack([net, net], [g, g, g], noise=cov, **opts)
    with pytest.raises(ValueError, match="1 noise covariances for 2 releases"):
        multi_release_gradient_attack(net, [g, g], noise=[cov], **opts)
    with pytest.raises(ValueError, match="no releases"):
        multi_release_gradient_attack(net, [], noise=cov, **opts)
    with pytest.raises(ValueError, match="stack"):
        multi_release_gradient_attack(net, g, noise=cov, **opts)
    with pytest.raises(ValueError, match="m=3 rows"):
        multi_release_gradient_attack(net, [g], noise=NoiseCovariance(1.0, torch.ones(3, 1), torch.ones(1)), **opts)
    with pytest.raises(ValueError, match="entries"):
        multi_release_gradient_attack(net, [g[:-1]], noise=cov, **opts)
    with pytest.raises(TypeError, match="NoiseCovariance"):
        multi_release_gradient_attack(net, [g], noise=[0.1], **opts)
    with pytest.raises(ValueError, match="optimizer"):
        multi_release_gradient_attack(net, [g], noise=cov, optimizer="sgd", **opts)
    with pytest.raises(ValueError, match="rel_tol=-1"):
        multi_release_gradient_attack(net, [g], noise=cov, rel_tol=-1.0, **opts)
    with pytest.raises(ValueError, match="init tensor"):
        multi_release_gradient_attack(net, [g], noise=cov, init=torch.zeros(2, 64), **opts)
    before = [p.detach().clone() for p in net.parameters()]
    multi_release_gradient_attack(net, [g], noise=cov, **opts)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the victim is not modified
