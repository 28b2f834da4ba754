"""InvLoss against Monte-Carlo Bayes error, the trace formula, and the monotonicity the theory predicts."""

import math

import pytest
import torch
from torch import nn

from invdefend.jacobian import embedding_jacobian
from invdefend.risk import NoiseModel, RiskEstimate, invloss, leakage, predicted_psnr
from invdefend.spectral import Spectrum, exact_spectrum, tail_quadrature, topk_spectrum

V0 = 1.0 / 12


def _linear_case(m: int = 30, d: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(A)
    op = embedding_jacobian(layer, torch.rand(1, d, generator=g, dtype=torch.float64))
    return A, op, exact_spectrum(op)


def _monte_carlo_bayes_mse(A: torch.Tensor, Sigma: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """Per-coordinate MSE of the Bayes (posterior-mean) estimator x̂ = μ + v0 Aᵀ(v0 AAᵀ + Σ)⁻¹(s̃ − Aμ)."""
    m, d = A.shape
    g = torch.Generator().manual_seed(seed)
    mu = torch.full((d,), 0.5, dtype=torch.float64)
    x = mu + math.sqrt(V0) * torch.randn(n, d, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(Sigma)
    noise = torch.randn(n, m, generator=g, dtype=torch.float64) @ L.T
    released = x @ A.T + noise
    gain = V0 * A.T @ torch.linalg.inv(V0 * A @ A.T + Sigma)
    x_hat = mu + (released - mu @ A.T) @ gain.T
    per_sample = ((x_hat - x) ** 2).mean(dim=1)
    return float(per_sample.mean()), float(per_sample.std() / math.sqrt(n))


def _trace_formula(A: torch.Tensor, Sigma: torch.Tensor) -> float:
    d = A.shape[1]
    post = torch.linalg.inv(A.T @ torch.linalg.inv(Sigma) @ A + torch.eye(d, dtype=A.dtype) / V0)
    return float(torch.trace(post) / d)


def test_invloss_matches_monte_carlo_isotropic():
    A, op, spec = _linear_case()
    tau = 0.05
    predicted = float(invloss(spec, NoiseModel(isotropic=tau, rho=0.0), v0=V0)[0])
    Sigma = tau * torch.eye(A.shape[0], dtype=torch.float64)
    mc, se = _monte_carlo_bayes_mse(A, Sigma, 40000, seed=1)
    assert abs(mc - predicted) < 4 * se, (mc, predicted, se)
    assert predicted == pytest.approx(_trace_formula(A, Sigma), rel=1e-9)


def test_invloss_matches_monte_carlo_shaped():
    A, op, spec = _linear_case(seed=3)
    U = spec.left_vectors[0]  # (m, d): range(J)
    m = A.shape[0]
    iso = 1e-3
    shaped = torch.linspace(0.5, 0.0, U.shape[1], dtype=torch.float64) ** 2  # more noise on the top directions
    Sigma = U @ torch.diag(shaped) @ U.T + iso * torch.eye(m, dtype=torch.float64)
    predicted = float(invloss(spec, NoiseModel(isotropic=iso, shaped=shaped.unsqueeze(0), rho=0.0), v0=V0)[0])
    mc, se = _monte_carlo_bayes_mse(A, Sigma, 40000, seed=2)
    assert abs(mc - predicted) < 4 * se, (mc, predicted, se)
    assert predicted == pytest.approx(_trace_formula(A, Sigma), rel=1e-9)


def test_crb_limit_without_prior_is_the_unbiased_bound():
    A, op, spec = _linear_case(seed=4)
    tau = 1e-4
    s2 = spec.singular_values[0] ** 2
    crb = float((tau / s2).sum() / A.shape[1])  # (1/d) tr (Aᵀ Σ⁻¹ A)⁻¹
    near_flat_prior = float(invloss(spec, NoiseModel(isotropic=tau, rho=0.0), v0=1e6)[0])
    assert near_flat_prior == pytest.approx(crb, rel=1e-3)


def test_bounds_and_reported_forms():
    _, _, spec = _linear_case()
    for tau in (0.0, 1e-6, 1e-2, 1e3):
        il = invloss(spec, NoiseModel(isotropic=tau, rho=0.0), v0=V0)
        assert 0.0 <= float(il) <= V0 + 1e-15
    huge = invloss(spec, NoiseModel(isotropic=1e12, rho=0.0), v0=V0)
    assert float(leakage(huge, V0)) < 1e-6
    assert float(predicted_psnr(huge)) == pytest.approx(10 * math.log10(12), abs=1e-4)
    assert float(invloss(spec, NoiseModel(isotropic=0.0, rho=0.0), v0=V0)) == 0.0  # full rank, no noise


def test_more_noise_lowers_leakage_and_bigger_jacobian_raises_it():
    A, op, spec = _linear_case()
    leaks = [float(leakage(invloss(spec, NoiseModel(isotropic=t, rho=0.0), v0=V0), V0)) for t in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert all(a > b for a, b in zip(leaks, leaks[1:]))
    base = float(leakage(invloss(spec, NoiseModel(isotropic=1e-2, rho=0.0), v0=V0), V0))
    scaled = Spectrum(**{**spec.__dict__, "singular_values": 3 * spec.singular_values})
    assert float(leakage(invloss(scaled, NoiseModel(isotropic=1e-2, rho=0.0), v0=V0), V0)) > base
    # the reference precision scales with ||F||: scaling F and J together leaves the reference risk unchanged
    both = Spectrum(**{**scaled.__dict__, "signal_norm": 3 * spec.signal_norm})
    torch.testing.assert_close(invloss(both, NoiseModel(), v0=V0), invloss(spec, NoiseModel(), v0=V0))


def test_topk_overstates_risk_compared_with_full_spectrum(lenet_case):
    from invdefend.jacobian import gradient_jacobian

    model, loss, x, y = lenet_case
    op = gradient_jacobian(model, loss, x, y)
    k16 = topk_spectrum(op, 16, generator=torch.Generator().manual_seed(0))
    k16.tail = tail_quadrature(op, k16, probes=4, steps=24, generator=torch.Generator().manual_seed(1))
    for noise in (NoiseModel(), NoiseModel(isotropic=1e-4), NoiseModel(isotropic=1e-2)):
        conservative = invloss(k16, noise, tail="topk")
        quadrature = invloss(k16, noise, tail="slq")
        assert float(conservative) <= float(quadrature), "top-k must under-state InvLoss (over-state risk)"


def test_topk_overstates_risk_against_exact_full_spectrum():
    A, op, full = _linear_case(m=50, d=40, seed=5)
    partial = full.select([0])
    partial = Spectrum(**{**partial.__dict__, "singular_values": full.singular_values[:, :8],
                          "left_vectors": full.left_vectors[:, :, :8], "right_vectors": full.right_vectors[:, :, :8],
                          "complete": False})
    for tau in (1e-6, 1e-3, 1e-1):
        noise = NoiseModel(isotropic=tau, rho=0.0)
        assert float(invloss(partial, noise, v0=V0, tail="topk")) <= float(invloss(full, noise, v0=V0))


def test_risk_estimate_and_noise_model_validation():
    _, _, spec = _linear_case()
    est = RiskEstimate.from_spectrum(spec, NoiseModel(isotropic=1e-3))
    assert est.tail == "exact" and est.invloss.shape == (1,)
    with pytest.raises(ValueError, match="isotropic"):
        NoiseModel(isotropic=-1.0)
    with pytest.raises(ValueError, match="rho"):
        NoiseModel(rho=float("nan"))
    with pytest.raises(ValueError, match="shaped noise has"):
        invloss(spec, NoiseModel(shaped=torch.ones(1, 3)))
