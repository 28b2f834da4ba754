"""Tests for the defense-aware attacker (invdefend.attacks.defense_aware)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

from invdefend.attacks import (
    NoiseCovariance,
    defense_aware_embedding_attack,
    defense_aware_gradient_attack,
    dlg,
    invert_embedding,
    mean_release,
    model_gradient,
)
from invdefend.data import load_digits_tensors
from invdefend.metrics import psnr
from invdefend.models import MLP, LeNet, uniform_init_

D64 = torch.float64


def _random_cov(m: int = 30, r: int = 5, batch: int | None = None, sigma2: float = 0.3) -> NoiseCovariance:
    gen = torch.Generator().manual_seed(0)
    lead = () if batch is None else (batch,)
    basis = torch.randn(*lead, m, r, generator=gen, dtype=D64)  # not orthonormal
    tau = 5.0 * torch.rand(*lead, r, generator=gen, dtype=D64)
    tau[..., 0] = 0.0  # a zero variance must be allowed
    return NoiseCovariance(sigma2, basis, tau)


def test_inverse_and_mahalanobis_match_dense() -> None:
    cov = _random_cov()
    s = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=D64)
    dense = cov.dense()
    expected = torch.linalg.solve(dense, s.T).T
    assert torch.allclose(cov.inverse_apply(s), expected, atol=1e-10)
    assert torch.allclose(cov.mahalanobis(s), (s * expected).sum(1), atol=1e-9)
    assert torch.allclose(cov.scaled(0.25).dense(), 0.25 * dense)


def test_per_sample_basis_matches_dense() -> None:
    cov = _random_cov(batch=3)
    s = torch.randn(3, 30, generator=torch.Generator().manual_seed(2), dtype=D64)
    dense = cov.dense()  # (3, m, m)
    expected = torch.linalg.solve(dense, s.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(cov.inverse_apply(s), expected, atol=1e-10)
    assert torch.allclose(cov.mahalanobis(s), (s * expected).sum(-1), atol=1e-9)


def test_zero_isotropic_part_uses_documented_floor() -> None:
    low = _random_cov(sigma2=0.0)
    floor = low.floor_rel * float(low.tau.max())
    assert low.effective_sigma2 == pytest.approx(floor)
    ref = NoiseCovariance(floor, low.basis, low.tau)
    s = torch.randn(30, generator=torch.Generator().manual_seed(3), dtype=D64)
    assert torch.allclose(low.inverse_apply(s), ref.inverse_apply(s))


def test_sample_has_the_covariance() -> None:
    cov = _random_cov(m=8, r=2, sigma2=0.5)
    draws = cov.sample((40000,), torch.Generator().manual_seed(4), D64)
    empirical = draws.T @ draws / draws.shape[0]
    dense = cov.dense()
    assert torch.allclose(empirical, dense, atol=0.05 * float(dense.diagonal().max()))
    # the low-rank part matters: the isotropic part alone is far off
    assert not torch.allclose(empirical, NoiseCovariance(0.5).dense(8), atol=0.05 * float(dense.diagonal().max()))


def test_noise_covariance_validation() -> None:
    u = torch.randn(10, 2)
    with pytest.raises(ValueError, match="invdefend.noise_law.NoiseCovariance.*negative"):
        NoiseCovariance(1.0, u, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="together"):
        NoiseCovariance(1.0, u, None)
    with pytest.raises(ValueError, match="disagree"):
        NoiseCovariance(1.0, u, torch.ones(3))
    with pytest.raises(ValueError, match="sigma2_iso"):
        NoiseCovariance(-1.0)
    with pytest.raises(ValueError, match="no noise"):
        NoiseCovariance(0.0)


def test_mean_release_averages_and_scales() -> None:
    cov = NoiseCovariance(2.0, torch.eye(4)[:, :1], torch.tensor([6.0]))
    releases = [torch.full((4,), float(k)) for k in range(3)]
    mean, cov_n, n = mean_release(releases, cov, 1)
    assert n == 3 and torch.equal(mean, torch.full((4,), 1.0))
    assert cov_n.sigma2_iso == pytest.approx(2.0 / 3) and torch.allclose(cov_n.tau, torch.tensor([2.0]))
    with pytest.raises(ValueError, match="dims"):
        mean_release(torch.zeros(2, 3, 4), cov, 1)


def _gradient_jacobian(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact J = d(grad_theta loss)/dx, (m, d), with torch.func (test helper, small models only)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def g_of(xx: torch.Tensor) -> torch.Tensor:
        gd = grad(lambda p: F.cross_entropy(functional_call(net, p, (xx,)), y))(params)
        return torch.cat([gd[k].reshape(-1) for k in params])

    return jacfwd(g_of)(x).reshape(-1, x.numel())


@pytest.mark.slow
def test_defense_aware_beats_naive_on_anisotropic_gradient_noise() -> None:
    """Noise of variance s_i² (one pixel-unit of displacement) on the 8 leading directions of J, plus a tiny
    isotropic floor. Measured over 3 digits: defense-aware 40-42 dB, DLG 10-16 dB, the same MAP attacker
    assuming isotropic noise of equal energy 10-14 dB."""
    x_all, y_all = load_digits_tensors(D64)
    aware, naive, iso = [], [], []
    for i in range(3):
        net = uniform_init_(LeNet(in_channels=1, image_size=8), generator=torch.Generator().manual_seed(i)).double()
        x, y = x_all[i : i + 1], y_all[i : i + 1]
        u, s, _ = torch.linalg.svd(_gradient_jacobian(net, x, y), full_matrices=False)
        g = model_gradient(net, x, y, F.cross_entropy)
        sigma2 = float((1e-3 * g.norm()) ** 2 / g.numel())
        cov = NoiseCovariance(sigma2, u[:, :8], s[:8] ** 2)
        released = g + cov.sample((), torch.Generator().manual_seed(100 + i), D64)
        energy = sigma2 + float((s[:8] ** 2).sum()) / g.numel()
        opts = dict(input_shape=x.shape, labels=y, iterations=300, seed=i)
        a = defense_aware_gradient_attack(net, released, noise=cov, **opts)
        b = dlg(net, released, dtype=D64, **opts)
        c = defense_aware_gradient_attack(net, released, noise=NoiseCovariance(energy), **opts)
        aware.append(float(psnr(a.reconstruction, x)[0]))
        naive.append(float(psnr(b.reconstruction, x)[0]))
        iso.append(float(psnr(c.reconstruction, x)[0]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"defense-aware {aware}, DLG {naive}, isotropic MAP {iso}")
    assert mean(aware) > mean(naive) + 10.0
    assert mean(aware) > mean(iso) + 10.0


def test_gradient_release_formats_agree() -> None:
    x_all, y_all = load_digits_tensors(D64)
    torch.manual_seed(0)
    net = MLP(64, hidden=(8,), out_features=10, activation="sigmoid").double()
    x, y = x_all[:1], y_all[:1]
    g = model_gradient(net, x, y, F.cross_entropy)
    cov = NoiseCovariance(1e-4)
    sizes = [p.numel() for p in net.parameters()]
    pieces = [t.reshape(p.shape) for t, p in zip(torch.split(g, sizes), net.parameters())]
    opts = dict(noise=cov, input_shape=x.shape, labels=y, iterations=20, seed=0)
    a = defense_aware_gradient_attack(net, g, **opts)
    b = defense_aware_gradient_attack(net, pieces, **opts)
    c = defense_aware_gradient_attack(net, [g, g], **opts)
    d = defense_aware_gradient_attack(net, torch.stack([g, g]), **opts)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(c.reconstruction, d.reconstruction) and c.info["releases"] == 2
    with pytest.raises(ValueError, match="noise basis has m=3"):
        wrong = NoiseCovariance(1.0, torch.ones(3, 1), torch.ones(1))
        defense_aware_gradient_attack(net, g, **{**opts, "noise": wrong})


def test_defense_aware_embedding_beats_naive_and_uses_releases() -> None:
    """Per-sample noise of variance s_i² on the top 8 directions of each sample's embedding Jacobian.

    Measured (4 digits): defense-aware 18.7-20.3 dB from one release, 23.2-25.3 dB from 8; the naive
    inversion 8.1-9.4 dB from one release."""
    x_all, _ = load_digits_tensors(D64)
    torch.manual_seed(0)
    bottom = MLP(64, hidden=(128,), out_features=96, activation="tanh").double()
    x = x_all[:4]
    jac = vmap(jacrev(lambda xi: bottom(xi[None])[0]))(x).reshape(4, 96, 64).detach()
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)
    h = bottom(x).detach()
    sigma2 = float((1e-2 * h.norm(dim=1).mean()) ** 2 / 96)
    cov = NoiseCovariance(sigma2, u[:, :, :8], s[:, :8] ** 2)
    gen = torch.Generator().manual_seed(5)
    releases = [h + cov.sample((), gen, D64) for _ in range(8)]
    one = defense_aware_embedding_attack(bottom, releases[0], noise=cov, input_shape=x.shape, iterations=300)
    many = defense_aware_embedding_attack(bottom, releases, noise=cov, input_shape=x.shape, iterations=300)
    naive = invert_embedding(bottom, releases[0], input_shape=x.shape)
    p_one, p_many = psnr(one.reconstruction, x), psnr(many.reconstruction, x)
    p_naive = psnr(naive.reconstruction, x)
    assert many.info["releases"] == 8 and one.label is None
    assert float(p_one.mean()) > float(p_naive.mean()) + 5.0
    assert float(p_many.mean()) > float(p_one.mean()) + 2.0
