"""Many releases attacked at once (invdefend.attacks.batched): the same gradients, real reconstructions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invdefend.attacks import model_gradient
from invdefend.attacks.batched import batched_gradient_attack, release_gradients
from invdefend.data import photo_patches
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_
from invdefend.prior import GaussianPrior

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    model = uniform_init_(LeNet(image_size=16, num_classes=9), generator=torch.Generator().manual_seed(0)).eval()
    aux, _ = photo_patches(600, size=16, seed=0, part="left")
    x, y = photo_patches(4, size=16, seed=1, part="right")
    return model, GaussianPrior.fit(aux, rank=64), x.reshape(2, 2, *SHAPE), y.reshape(2, 2)


def test_release_gradients_are_the_batch_mean_gradients(case):
    model, _, x, y = case
    got = release_gradients(model, x, y)
    for r in range(2):
        assert torch.allclose(got[r], model_gradient(model, x[r], y[r], F.cross_entropy), rtol=1e-4, atol=1e-7)


def test_map_with_the_prior_reconstructs_undefended_releases(case):
    model, prior, x, y = case
    x1, y1 = x.reshape(4, 1, *SHAPE), y.reshape(4, 1)
    t = release_gradients(model, x1, y1)
    m = t.shape[1]
    out = batched_gradient_attack(model, t, y1, sample_shape=SHAPE, objective="map", prior=prior,
                                  noise_variance=1e-8 * t.pow(2).sum(1) / m, tv_weight=0.0, iterations=150)
    got = [float(psnr(out.reconstructions[i, 0], x1[i, 0])) for i in range(4)]
    base = [float(psnr(prior.mean.reshape(SHAPE).clamp(0, 1), x1[i, 0])) for i in range(4)]
    assert min(g - b for g, b in zip(got, base)) > 8.0  # far beyond what the prior alone gives
    assert out.reconstructions.shape == (4, 1, *SHAPE) and out.final_losses.shape == (4,)


def test_map_releases_of_very_different_noise_share_one_call(case):
    """Each release's objective is normalised: an undefended release does not stall a noisy one."""
    model, prior, x, y = case
    x1, y1 = x.reshape(4, 1, *SHAPE)[:2], y.reshape(4, 1)[:2]
    t = release_gradients(model, x1, y1)
    m = t.shape[1]
    energy = t.pow(2).sum(1) / m
    noisy = t + (0.1 * energy).sqrt().unsqueeze(1) * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    both = torch.stack([t[0], noisy[1]])
    var = torch.stack([1e-8 * energy[0], 0.1 * energy[1]])
    joint = batched_gradient_attack(model, both, y1, sample_shape=SHAPE, objective="map", prior=prior,
                                    noise_variance=var, tv_weight=0.0, iterations=100)
    alone = batched_gradient_attack(model, noisy[1:], y1[1:], sample_shape=SHAPE, objective="map", prior=prior,
                                    noise_variance=var[1:], tv_weight=0.0, iterations=100)
    p_joint = float(psnr(joint.reconstructions[1, 0], x1[1, 0]))
    p_alone = float(psnr(alone.reconstructions[0, 0], x1[1, 0]))
    assert p_joint > p_alone - 1.5


def test_inverting_gradients_keeps_the_best_restart_and_beats_its_start(case):
    model, _, x, y = case
    t = release_gradients(model, x, y)
    out = batched_gradient_attack(model, t, y, sample_shape=SHAPE, objective="cosine", iterations=200, restarts=2,
                                  seed=0)
    assert out.restart_losses.shape == (2, 2)
    assert torch.equal(out.final_losses, out.restart_losses.min(dim=0).values)
    start = torch.rand((2, 2, *SHAPE), generator=torch.Generator().manual_seed(0))
    flat = lambda t: t.reshape(4, *SHAPE)  # noqa: E731
    assert float(psnr(flat(out.reconstructions), flat(x)).mean()) > float(psnr(flat(start), flat(x)).mean()) + 3.0


def test_bad_input_is_refused(case):
    model, prior, x, y = case
    t = release_gradients(model, x, y)
    with pytest.raises(ValueError, match="objective"):
        batched_gradient_attack(model, t, y, sample_shape=SHAPE, objective="dlg")
    with pytest.raises(ValueError, match="noise_variance"):
        batched_gradient_attack(model, t, y, sample_shape=SHAPE, objective="map")
    with pytest.raises(ValueError, match="for objective='map' only"):
        batched_gradient_attack(model, t, y, sample_shape=SHAPE, prior=prior)
    with pytest.raises(ValueError, match="trainable parameters"):
        batched_gradient_attack(model, t[:, :10], y, sample_shape=SHAPE)
    with pytest.raises(ValueError, match=r"\(N, m\)"):
        batched_gradient_attack(model, t, y[:1], sample_shape=SHAPE)


def test_init_chains_attacks_and_is_checked(case):
    """Restart 0 starts at ``init`` (another attack's output): started at the truth, MAP stays near it, far
    above the same attack from the prior mean with the same tiny budget."""
    model, prior, x, y = case
    x1, y1 = x.reshape(4, 1, *SHAPE)[:2], y.reshape(4, 1)[:2]
    t = release_gradients(model, x1, y1)
    var = 1e-8 * t.pow(2).sum(1) / t.shape[1]
    kw = dict(sample_shape=SHAPE, objective="map", prior=prior, noise_variance=var, tv_weight=0.0, iterations=3)
    warm = batched_gradient_attack(model, t, y1, init=x1, **kw)
    cold = batched_gradient_attack(model, t, y1, **kw)
    p = lambda out: float(psnr(out.reconstructions.reshape(2, *SHAPE), x1.reshape(2, *SHAPE)).mean())  # noqa: E731
    assert p(warm) > 40.0 and p(warm) > p(cold) + 10.0
    ig = batched_gradient_attack(model, t, y1, sample_shape=SHAPE, iterations=1, init=x1, seed=0)
    assert float(psnr(ig.reconstructions.reshape(2, *SHAPE), x1.reshape(2, *SHAPE)).mean()) > 15.0
    with pytest.raises(ValueError, match="init must have shape"):
        batched_gradient_attack(model, t, y1, init=x1[:1], **kw)
    with pytest.raises(ValueError, match="non-finite"):
        batched_gradient_attack(model, t, y1, init=torch.full_like(x1, float("nan")), **kw)
