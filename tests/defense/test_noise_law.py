"""The public noise law of a release is the law of the noise actually released (Monte-Carlo), for every
placement, and the band-pass law is the Gaussian its draw approximates."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_problems import flat_grad, make_problem, set_grad

from invdefend import BandPassLaw, EmbeddingDefense, GradientDefense, NoiseCovariance
from invdefend.allocation import placement_variances
from invdefend.jacobian import gradient_jacobian
from invdefend.models import MLP
from invdefend.spectral import exact_spectrum

DRAWS = 3000


def _gradient_deltas(**settings) -> tuple[GradientDefense, torch.Tensor]:
    model, crit, x, y = make_problem(seed=3, batch=4)
    defense = GradientDefense(model, crit, k=4, probes=2, refresh_every=10**6, seed=0, **settings)
    model.zero_grad()
    crit(model(x), y).backward()
    g = flat_grad(model)
    deltas = []
    for _ in range(DRAWS):
        set_grad(model, g)
        defense.protect()
        deltas.append(flat_grad(model) - g)
    return defense, torch.stack(deltas)


@pytest.mark.parametrize("settings", [dict(mechanism="spectral", budget=0.2, floor=0.02),
                                      dict(mechanism="isotropic", budget=0.1),
                                      dict(mechanism="spectral", target_psnr=25.0, floor=0.01)])
def test_gradient_law_is_the_covariance_of_the_released_noise(settings) -> None:
    defense, deltas = _gradient_deltas(**settings)
    law = defense.noise_law()
    assert isinstance(law, NoiseCovariance)
    dense = law.dense(deltas.shape[1])
    empirical = deltas.T @ deltas / DRAWS
    scale = float(dense.diagonal().max())
    assert torch.allclose(empirical, dense, atol=0.12 * scale)
    # the trace (total energy) is pinned much tighter than single entries
    assert float(empirical.trace()) == pytest.approx(float(dense.trace()), rel=0.05)
    # projections on the law's own basis carry the planned variances
    if law.basis is not None:
        basis = law.basis[:, law.tau > 0]
        tau = law.tau[law.tau > 0]
        proj = deltas @ basis
        var = proj.pow(2).mean(0)
        expected = tau + law.sigma2_iso * basis.pow(2).sum(0)  # columns are unit vectors
        # other probes' noise leaks into a column where the bases overlap: bounded below by the own term
        assert bool((var >= 0.8 * expected).all())


def test_monitor_and_fallback_laws() -> None:
    model, crit, x, y = make_problem(seed=1)
    defense = GradientDefense(model, crit, mechanism="monitor", k=4, seed=0)
    crit(model(x), y).backward()
    defense.protect()
    assert defense.noise_law() is None  # nothing was added
    fallback = GradientDefense(model, crit, budget=0.05, fallback_budget=0.7, k=4, max_residual=1e-30, seed=0)
    model.zero_grad()
    crit(model(x), y).backward()
    g = flat_grad(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = fallback.protect()
    assert record.fallback
    law = fallback.noise_law()
    assert law.basis is None and law.sigma2_iso == pytest.approx(0.7 * float(g @ g) / g.numel(), rel=1e-9)


def test_band_pass_law_is_the_gaussian_its_draw_approximates() -> None:
    model, crit, x, y = make_problem(seed=5, batch=1)
    defense = GradientDefense(model, crit, mechanism="band_pass", budget=0.3, floor=0.1, k=4, probes=1, seed=0)
    crit(model(x), y).backward()
    g = flat_grad(model)
    G = float(g @ g)
    record = defense.protect()
    law = defense.noise_law()
    assert isinstance(law, BandPassLaw)
    assert law.mu.tolist() == record.noise_parameters["band_pass_mu"]
    assert law.budget == pytest.approx(0.3) and law.floor == pytest.approx(0.1, rel=1e-9)
    assert law.signal_energy == pytest.approx(G, rel=1e-12)
    with torch.enable_grad():
        spec = exact_spectrum(gradient_jacobian(model, crit, x, y))
    cov = law.covariance(spec)
    s = spec.singular_values[0]
    r = cov.tau.shape[0]
    assert float(cov.tau.sum()) == pytest.approx(0.3 * G, rel=1e-9)
    shape = s[:r] ** 2 / (s[:r] ** 2 + float(law.mu[0])) ** 2
    assert torch.allclose(cov.tau / cov.tau.sum(), shape / shape.sum(), rtol=1e-9)
    assert cov.sigma2_iso == pytest.approx(0.1 * G / g.numel(), rel=1e-9)
    expected = placement_variances(s.unsqueeze(0), 0.3 * G, "band_pass", mu=float(law.mu[0]))[0, :r]
    assert torch.allclose(cov.tau, expected)


def test_embedding_law_is_the_covariance_of_the_released_noise() -> None:
    torch.manual_seed(0)
    bottom = MLP(6, hidden=(), out_features=5, activation="tanh", final_activation=True).double()
    defense = EmbeddingDefense(bottom, mechanism="spectral", budget=0.3, floor=0.05, seed=1)
    x = torch.rand(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = bottom(x).detach()
    spec = defense.estimate(x)
    defense.estimate = lambda inputs: spec
    deltas = torch.stack([defense.protect(x, h) - h for _ in range(DRAWS)])  # (N, B, m)
    laws = defense.noise_law()
    assert len(laws) == 2
    for b, law in enumerate(laws):
        dense = law.dense()
        emp = deltas[:, b].T @ deltas[:, b] / DRAWS
        assert torch.allclose(emp, dense, atol=0.1 * float(dense.diagonal().max()))
        assert float(emp.trace()) == pytest.approx(float(dense.trace()), rel=0.05)
