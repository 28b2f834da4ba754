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


def _wide_linear_case():
    """F(x) = A x with m = 8 < d = 12 (four null directions), spectrum taken at a point x0."""
    g = torch.Generator().manual_seed(7)
    m, d = 8, 12
    A = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    x0 = torch.rand(d, generator=g, dtype=torch.float64)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(A)
    return A, x0, exact_spectrum(embedding_jacobian(layer, x0.unsqueeze(0)))


def _invloss_by_hand(A: torch.Tensor, tau: float, v0: float) -> float:
    """(1/d)·[Σ_{i ≤ min(m,d)} 1/(s_i²/τ + 1/v0) + (d − min(m,d))·v0], singular values from svdvals."""
    m, d = A.shape
    s = torch.linalg.svdvals(A)
    head = sum(1.0 / (float(si) ** 2 / tau + 1.0 / v0) for si in s)
    return (head + (d - min(m, d)) * v0) / d


def test_reference_precision_is_rho_times_signal_norm_squared_over_m():
    """τ_ref = (ρ·‖F(x)‖)²/m, in every direction, added to the isotropic noise: the closed form by hand."""
    A, x0, spec = _wide_linear_case()
    m = A.shape[0]
    signal = float((A @ x0).norm())
    assert float(spec.signal_norm[0]) == pytest.approx(signal, rel=1e-12)
    for rho, iso in ((0.1, 0.0), (0.03, 0.0), (0.1, 5e-3)):
        tau_ref = (rho * signal) ** 2 / m
        expected = _invloss_by_hand(A, tau_ref + iso, V0)
        got = float(invloss(spec, NoiseModel(isotropic=iso, rho=rho), v0=V0)[0])
        assert got == pytest.approx(expected, rel=1e-10), (rho, iso)
    # the default noise model is the reference precision alone, at DEFAULT_RHO
    from invdefend.risk import DEFAULT_RHO

    expected = _invloss_by_hand(A, (DEFAULT_RHO * signal) ** 2 / m, V0)
    assert float(invloss(spec, v0=V0)[0]) == pytest.approx(expected, rel=1e-10)


def test_reference_precision_matches_monte_carlo_bayes_error():
    """A release A x + ε, ε ~ N(0, τ_ref I) with τ_ref = (ρ‖A x0‖)²/m, ρ > 0: the Bayes estimator's empirical
    MSE per coordinate under the prior N(μ, v0 I) is the InvLoss of NoiseModel(rho=ρ)."""
    A, x0, spec = _wide_linear_case()
    m = A.shape[0]
    rho = 0.1
    tau_ref = (rho * float((A @ x0).norm())) ** 2 / m
    predicted = float(invloss(spec, NoiseModel(rho=rho), v0=V0)[0])
    mc, se = _monte_carlo_bayes_mse(A, tau_ref * torch.eye(m, dtype=torch.float64), 40000, seed=11)
    assert abs(mc - predicted) < 4 * se, (mc, predicted, se)
    # the check has teeth: the reference noise without the 1/m (m times larger) is far outside the error bar
    wrong = _invloss_by_hand(A, tau_ref * m, V0)
    assert abs(mc - wrong) > 20 * se, (mc, wrong, se)


# -- formulas pinned to hand-computed values (each kills mutants the Monte-Carlo tests let through) --------


def _terms_by_hand(s2: float, tau: float, v0: float) -> float:
    if tau == 0 and s2 == 0:
        return v0
    return v0 * tau / (tau + v0 * s2)


def test_invloss_from_values_topk_tail_and_null_space_by_hand():
    """k held values, ``rank_bound − k`` unheld ones at ``s_k`` with ``tail_tau``, ``d − rank_bound`` null
    directions at v0; a 1-D input is one sample; a python-float tau is taken in the values' dtype."""
    from invdefend.risk import invloss_from_values

    s = torch.tensor([3.0, 1.5, 0.4], dtype=torch.float64)
    tau, tail_tau, d, rank_bound = 1.1e-3, torch.tensor([2.3e-3], dtype=torch.float64), 9, 6
    got = invloss_from_values(s, tau, in_dim=d, v0=V0, tail_tau=tail_tau, rank_bound=rank_bound)
    head = sum(_terms_by_hand(float(v) ** 2, tau, V0) for v in s)
    tail = (rank_bound - 3) * _terms_by_hand(0.4**2, 2.3e-3, V0) + (d - rank_bound) * V0
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx((head + tail) / d, rel=1e-13)
    # a zero singular value with zero noise is a hidden direction (v0), not 0/0
    zero = invloss_from_values(torch.tensor([[2.0, 0.0]], dtype=torch.float64), 0.0, in_dim=2, v0=V0, rank_bound=2)
    assert torch.isfinite(zero).all() and float(zero[0]) == pytest.approx(V0 / 2, rel=1e-15)
    with pytest.raises(ValueError, match="v0=0"):
        invloss_from_values(s, tau, in_dim=d, v0=0.0, tail_tau=tail_tau)


def _spectrum_with_exact_tail(k: int = 4):
    """A linear case's exact spectrum, cut to its top k, with a 'quadrature rule' whose nodes are exactly the
    remaining eigenvalues (unit weights): SLQ must then reproduce the complete spectrum's InvLoss."""
    from invdefend.spectral import SpectralQuadrature

    _, _, full = _linear_case(m=30, d=12, seed=3)
    s = full.singular_values
    nodes = (s[:, k:] ** 2).unsqueeze(1)  # (B, 1, n)
    rule = SpectralQuadrature(nodes=nodes, weights=torch.ones_like(nodes), probes=1, steps=nodes.shape[-1])
    cut = Spectrum(singular_values=s[:, :k], right_vectors=None, left_vectors=None, in_dim=full.in_dim,
                   out_dim=full.out_dim, signal_norm=full.signal_norm, method="subspace", complete=False, tail=rule)
    return full, cut


def test_slq_tail_reproduces_the_complete_spectrum_and_topk_does_not():
    full, cut = _spectrum_with_exact_tail()
    noise = NoiseModel(isotropic=3e-4, rho=0.01)
    exact = invloss(full, noise, v0=V0)
    assert torch.allclose(invloss(cut, noise, v0=V0, tail="slq"), exact, rtol=1e-12)
    assert torch.allclose(invloss(cut, noise, v0=V0), exact, rtol=1e-12)  # "auto" uses the rule
    topk = invloss(cut, noise, v0=V0, tail="topk")
    assert float(topk[0]) < float(exact[0]) * 0.999  # conservative: less error, more risk
    bare = Spectrum(singular_values=cut.singular_values, right_vectors=None, left_vectors=None, in_dim=cut.in_dim,
                    out_dim=cut.out_dim, signal_norm=cut.signal_norm, method="subspace", complete=False)
    with pytest.raises(ValueError, match="no quadrature rule"):
        invloss(bare, noise, v0=V0, tail="slq")
    with pytest.raises(ValueError, match="tail='nope'"):
        invloss(cut, noise, v0=V0, tail="nope")
    # shaped noise may be given as one (k,) vector for a single sample
    one = invloss(cut, NoiseModel(shaped=torch.full((4,), 1e-3, dtype=torch.float64)), v0=V0)
    two = invloss(cut, NoiseModel(shaped=torch.full((1, 4), 1e-3, dtype=torch.float64)), v0=V0)
    assert torch.equal(one, two)


def test_dynamic_range_enters_v0_and_psnr_squared():
    from invdefend.risk import default_prior_variance

    assert default_prior_variance(2.0) == pytest.approx(4.0 / 12, rel=1e-15)
    assert default_prior_variance() == pytest.approx(1.0 / 12, rel=1e-15)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="dynamic_range"):
            default_prior_variance(bad)
    assert float(predicted_psnr(0.01, 2.0)) == pytest.approx(10 * math.log10(4.0 / 0.01), rel=1e-13)
    assert float(predicted_psnr(0.01)) == pytest.approx(20.0, rel=1e-13)
    assert predicted_psnr(torch.tensor([0.01], dtype=torch.float32)).dtype == torch.float64


def test_leakage_is_clamped_to_the_unit_interval_with_the_default_prior():
    assert float(leakage(1.0 / 24)) == pytest.approx(0.5, rel=1e-15)  # v0 defaults to 1/12
    assert float(leakage(0.5, v0=0.25)) == 0.0  # more error than the prior: nothing leaked
    assert float(leakage(-0.1, v0=0.25)) == 1.0
    out = leakage(torch.tensor([0.05, 0.2], dtype=torch.float32), v0=0.1)
    assert out.dtype == torch.float64 and out.tolist() == pytest.approx([0.5, 0.0], rel=1e-7)


def test_risk_estimate_uses_the_dynamic_range_and_says_which_tail():
    full, cut = _spectrum_with_exact_tail()
    noise = NoiseModel(isotropic=1e-4)
    est = RiskEstimate.from_spectrum(cut, noise, dynamic_range=2.0)
    v0 = 4.0 / 12
    il = invloss(cut, noise, v0=v0)
    assert torch.allclose(est.invloss, il, rtol=1e-14)
    assert torch.allclose(est.predicted_psnr, 10 * torch.log10(4.0 / il), rtol=1e-12)
    assert torch.allclose(est.leakage, 1 - il / v0, rtol=1e-12)
    assert est.tail == "slq"
    assert RiskEstimate.from_spectrum(cut, noise, tail="topk").tail == "topk"
    assert RiskEstimate.from_spectrum(full, noise).tail == "exact"
    explicit = RiskEstimate.from_spectrum(cut, noise, v0=0.05)
    assert torch.allclose(explicit.invloss, invloss(cut, noise, v0=0.05), rtol=1e-14)


def test_noise_model_refuses_each_bad_field_alone():
    for shaped in (torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="shaped variances"):
            NoiseModel(shaped=shaped)
    for rho in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="rho="):
            NoiseModel(rho=rho)
    for iso in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="isotropic="):
            NoiseModel(isotropic=iso)
