"""Cumulative InvLoss over repeated releases (invdefend.cumulative) against the exact Bayes error of ``T``
noisy releases of a fixed linear map, its limits and bounds, and the release ledger."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invdefend.cumulative import ReleaseLedger, cumulative_invloss, cumulative_noise, cumulative_risk
from invdefend.jacobian import embedding_jacobian
from invdefend.risk import NoiseModel, RiskEstimate, invloss, predicted_psnr, reference_noise
from invdefend.spectral import exact_spectrum, tail_quadrature, topk_spectrum

V0 = 1.0 / 12
D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linear_case(m: int = 12, d: int = 8, seed: int = 0, batch: int = 1):
    """A fixed linear map ``A`` (the Jacobian, held) with decaying columns, its operator and exact spectrum."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=D64) * torch.logspace(0, -1.5, d, dtype=D64)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(A)
    op = embedding_jacobian(layer, 0.5 + torch.rand(batch, d, generator=g, dtype=D64))
    return A, exact_spectrum(op)


def _stacked_covariance(Sigma: torch.Tensor, tau_ref: float, T: int) -> torch.Tensor:
    """Covariance of ``(y_1..y_T)``: a systematic matching error shared by all releases, fresh noise each."""
    m = Sigma.shape[0]
    return tau_ref * torch.ones(T, T, dtype=D64).kron(torch.eye(m, dtype=D64)) + torch.eye(T, dtype=D64).kron(Sigma)


def _stacked_posterior_trace(A: torch.Tensor, C: torch.Tensor, T: int) -> float:
    """``(1/d) tr (A_Tᵀ C⁻¹ A_T + I/v0)⁻¹``, ``A_T`` the stack of ``T`` copies of ``A`` (no sufficiency used)."""
    d = A.shape[1]
    AT = A.repeat(T, 1)
    post = torch.linalg.inv(AT.T @ torch.linalg.solve(C, AT) + torch.eye(d, dtype=D64) / V0)
    return float(torch.trace(post) / d)


def _monte_carlo(A: torch.Tensor, C: torch.Tensor, T: int, n: int, seed: int) -> tuple[float, float]:
    """MSE per coordinate of the Bayes estimator from all ``T`` stacked releases (linear in them)."""
    m, d = A.shape
    g = torch.Generator().manual_seed(seed)
    AT = A.repeat(T, 1)
    mu = torch.full((d,), 0.5, dtype=D64)
    x = mu + math.sqrt(V0) * torch.randn(n, d, generator=g, dtype=D64)
    noise = torch.randn(n, m * T, generator=g, dtype=D64) @ torch.linalg.cholesky(C).T
    y = x @ AT.T + noise
    gain = V0 * AT.T @ torch.linalg.inv(V0 * AT @ AT.T + C)
    x_hat = mu + (y - mu @ AT.T) @ gain.T
    per = ((x_hat - x) ** 2).mean(dim=1)
    return float(per.mean()), float(per.std() / math.sqrt(n))


@pytest.mark.parametrize("shaped", [False, True])
def test_formula_is_the_bayes_error_of_T_releases_of_a_fixed_linear_map(shaped: bool) -> None:
    A, spec = _linear_case(seed=1 if shaped else 0)
    m = A.shape[0]
    T, rho, iso = 4, 0.02, 5e-3
    tau_ref = float(reference_noise(spec.signal_norm, m, rho)[0])
    U = spec.left_vectors[0]
    sh = (torch.linspace(0.02, 0.0, U.shape[1], dtype=D64) if shaped else torch.zeros(U.shape[1], dtype=D64))
    Sigma = iso * torch.eye(m, dtype=D64) + U @ torch.diag(sh) @ U.T
    noise = NoiseModel(isotropic=iso, shaped=sh.unsqueeze(0) if shaped else None, rho=rho)
    predicted = float(cumulative_invloss(spec, noise, T, v0=V0)[0])
    C = _stacked_covariance(Sigma, tau_ref, T)
    # exact: the posterior of all T stacked releases equals one release with noise τ_ref·I + Σ/T
    assert predicted == pytest.approx(_stacked_posterior_trace(A, C, T), rel=1e-9)
    mc, se = _monte_carlo(A, C, T, 20000, seed=2)
    assert abs(mc - predicted) < 4 * se, (mc, predicted, se)
    # and it is far from the per-release value: the repetition is what the test measures
    assert predicted < 0.8 * float(invloss(spec, noise, v0=V0)[0])


def test_without_reference_precision_the_information_is_T_times_one_release() -> None:
    A, spec = _linear_case(seed=3)
    d = A.shape[1]
    iso, T = 1e-2, 7
    info = T * A.T @ A / iso  # THEORY §7: Σ_t J_tᵀ Σ_t⁻¹ J_t with J_t = J
    exact = float(torch.trace(torch.linalg.inv(info + torch.eye(d, dtype=D64) / V0)) / d)
    got = float(cumulative_invloss(spec, NoiseModel(isotropic=iso, rho=0.0), T, v0=V0)[0])
    assert got == pytest.approx(exact, rel=1e-9)


def test_one_release_is_the_per_release_invloss() -> None:
    _, spec = _linear_case(batch=3, seed=4)
    g = torch.Generator().manual_seed(5)
    noises = [
        NoiseModel(),
        NoiseModel(isotropic=3e-3),
        NoiseModel(isotropic=torch.tensor([1e-3, 2e-3, 0.0], dtype=D64), rho=0.01),
        NoiseModel(isotropic=1e-4, shaped=torch.rand(3, spec.k, generator=g, dtype=D64) * 1e-2),
        NoiseModel(shaped=torch.rand(spec.k, generator=g, dtype=D64) * 1e-2),
    ]
    for noise in noises:
        torch.testing.assert_close(cumulative_invloss(spec, noise, 1, v0=V0), invloss(spec, noise, v0=V0))
        torch.testing.assert_close(cumulative_invloss(spec, noise, torch.ones(3, dtype=torch.long), v0=V0),
                                   invloss(spec, noise, v0=V0))
    torch.testing.assert_close(cumulative_invloss(spec, None, 1), invloss(spec, None))


def test_monotone_in_T_and_between_the_documented_bounds() -> None:
    _, spec = _linear_case(m=40, d=16, seed=6)
    noise = NoiseModel(isotropic=5e-3, rho=0.01)
    counts = [1, 2, 3, 5, 10, 100, 10_000]
    il = [float(cumulative_invloss(spec, noise, T, v0=V0)[0]) for T in counts]
    assert all(a > b for a, b in zip(il, il[1:]))
    undefended = float(invloss(spec, NoiseModel(rho=0.01), v0=V0)[0])
    p1 = float(predicted_psnr(il[0]))
    for T, value in zip(counts, il):
        p = float(predicted_psnr(value))
        assert p1 - 1e-9 <= p <= min(p1 + 10 * math.log10(T), float(predicted_psnr(undefended))) + 1e-9
    # T → ∞: only the reference precision is left (repetition erodes the noise, never more)
    far = float(cumulative_invloss(spec, noise, 1e12, v0=V0)[0])
    assert far == pytest.approx(undefended, rel=1e-6)
    # noise-free releases: identical copies teach nothing more
    clean = NoiseModel(rho=0.01)
    torch.testing.assert_close(cumulative_invloss(spec, clean, 50, v0=V0), invloss(spec, clean, v0=V0))


def test_per_sample_counts_match_one_sample_at_a_time() -> None:
    _, spec = _linear_case(batch=3, seed=7)
    shaped = torch.rand(3, spec.k, generator=torch.Generator().manual_seed(8), dtype=D64) * 1e-2
    noise = NoiseModel(isotropic=torch.tensor([1e-3, 4e-3, 2e-3], dtype=D64), shaped=shaped, rho=0.02)
    counts = torch.tensor([1, 4, 9])
    got = cumulative_invloss(spec, noise, counts, v0=V0)
    for i, T in enumerate(counts.tolist()):
        one = NoiseModel(isotropic=float(noise.isotropic[i]), shaped=shaped[i : i + 1], rho=0.02)
        expected = cumulative_invloss(spec.select([i]), one, T, v0=V0)
        torch.testing.assert_close(got[i : i + 1], expected)
    scaled = cumulative_noise(noise, counts, 3)
    torch.testing.assert_close(torch.as_tensor(scaled.isotropic), noise.isotropic / counts)
    torch.testing.assert_close(scaled.shaped, shaped / counts.unsqueeze(1))
    assert scaled.rho == noise.rho


def test_reference_averaging_is_the_documented_upper_bound() -> None:
    A, spec = _linear_case(batch=2, seed=9)
    m = A.shape[0]
    rho, iso = 0.05, 1e-3
    noise = NoiseModel(isotropic=iso, rho=rho)
    counts = torch.tensor([3, 8])
    avg = cumulative_invloss(spec, noise, counts, v0=V0, reference_averages=True)
    held = cumulative_invloss(spec, noise, counts, v0=V0)
    assert bool((avg < held).all())  # more risk
    for i, T in enumerate(counts.tolist()):
        tau_ref = float(reference_noise(spec.signal_norm[i : i + 1], m, rho)[0])
        all_noise = NoiseModel(isotropic=(tau_ref + iso) / T, rho=0.0)  # everything divides by T
        torch.testing.assert_close(avg[i : i + 1], invloss(spec.select([i]), all_noise, v0=V0))
    torch.testing.assert_close(cumulative_invloss(spec, noise, 1, v0=V0, reference_averages=True),
                               invloss(spec, noise, v0=V0))


def test_tails_go_through_invloss_unchanged(lenet_case) -> None:
    """A top-k spectrum of a real gradient Jacobian: the top-k tail and the quadrature tail of T releases are
    the per-release computation under the scaled noise, and both grow the risk with T."""
    import torch.nn.functional as F

    from invdefend.jacobian import gradient_jacobian

    model, _, x, y = lenet_case
    op = gradient_jacobian(model, F.cross_entropy, x, y)
    spec = topk_spectrum(op, k=4, oversample=4, max_sweeps=2, generator=torch.Generator().manual_seed(0))
    spec.tail = tail_quadrature(op, spec, probes=2, steps=8, generator=torch.Generator().manual_seed(1))
    energy = float(spec.signal_norm[0] ** 2)
    noise = NoiseModel(isotropic=1e-3 * energy / spec.out_dim)
    for tail in ("topk", "slq"):
        per = [float(cumulative_invloss(spec, noise, T, tail=tail)[0]) for T in (1, 4, 16)]
        assert per[0] > per[1] > per[2]
        scaled = NoiseModel(isotropic=noise.isotropic / 16)
        assert per[2] == pytest.approx(float(invloss(spec, scaled, tail=tail)[0]), rel=1e-6)
    risk = cumulative_risk(spec, noise, 16, tail="slq")
    base = RiskEstimate.from_spectrum(spec, noise, tail="slq")
    assert risk.tail == "slq" and float(risk.predicted_psnr[0]) > float(base.predicted_psnr[0])
    assert float(risk.leakage[0]) > float(base.leakage[0])


def test_a_moving_jacobian_can_leak_more_than_the_held_formula() -> None:
    """The documented non-conservative side: rank-deficient Jacobians that rotate between releases recover
    directions that the held Jacobian hides for ever (exact information sum vs held formula)."""
    d, m, T, iso = 10, 4, 3, 1e-3
    g = torch.Generator().manual_seed(10)
    Js = [torch.randn(m, d, generator=g, dtype=D64) for _ in range(T)]
    info = sum(J.T @ J / iso for J in Js)
    moving = float(torch.trace(torch.linalg.inv(info + torch.eye(d, dtype=D64) / V0)) / d)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(Js[-1])
    spec = exact_spectrum(embedding_jacobian(layer, torch.rand(1, d, generator=g, dtype=D64)))
    held = float(cumulative_invloss(spec, NoiseModel(isotropic=iso, rho=0.0), T, v0=V0)[0])
    assert held >= (d - m) / d * V0 - 1e-12  # the held null space stays hidden
    assert moving < 0.5 * held


def test_held_formula_is_optimistic_on_average_over_the_rounds() -> None:
    """Jensen (module docstring): InvLoss of the summed information Σ_t J_tᵀ(T·τ_ref + Σ_t)⁻¹J_t is at most the
    mean over rounds of the held formula at that round, with equality when the rounds agree."""
    d, m, T, rho, iso = 8, 14, 5, 0.02, 2e-3
    g = torch.Generator().manual_seed(13)
    base = torch.randn(m, d, generator=g, dtype=D64)
    x = 0.5 + torch.rand(1, d, generator=g, dtype=D64)
    for spread in (0.0, 0.3, 1.0):
        held, info = [], torch.zeros(d, d, dtype=D64)
        for _ in range(T):
            J = base + spread * torch.randn(m, d, generator=g, dtype=D64)
            layer = nn.Linear(d, m, bias=False).double()
            with torch.no_grad():
                layer.weight.copy_(J)
            spec = exact_spectrum(embedding_jacobian(layer, x))
            held.append(float(cumulative_invloss(spec, NoiseModel(isotropic=iso, rho=rho), T, v0=V0)[0]))
            tau_ref = float(reference_noise(spec.signal_norm, m, rho)[0])
            info += J.T @ J / (T * tau_ref + iso)
        moving = float(torch.trace(torch.linalg.inv(info + torch.eye(d, dtype=D64) / V0)) / d)
        mean_held = sum(held) / T
        if spread == 0.0:
            assert moving == pytest.approx(mean_held, rel=1e-9)
        else:
            assert moving < mean_held


def test_bad_release_counts_are_refused() -> None:
    _, spec = _linear_case(batch=2)
    noise = NoiseModel(isotropic=1e-3)
    for bad, match in ((0, ">= 1"), (-2, ">= 1"), (float("nan"), "finite"), (torch.tensor([1, 0]), ">= 1"),
                       (torch.tensor([1, 2, 3]), "shape"), (True, "bool"), ("3", "int or a tensor"),
                       (torch.tensor([[1, 2]]), "shape")):
        with pytest.raises(ValueError, match=f"invdefend.cumulative.*{match}"):
            cumulative_invloss(spec, noise, bad)
    with pytest.raises(ValueError, match="shaped noise has shape"):
        cumulative_noise(NoiseModel(shaped=torch.ones(3, 2, 2)), 2, 2)


# -- the ledger --------------------------------------------------------------------------------------------


def test_ledger_counts_releases_per_sample_id() -> None:
    ledger = ReleaseLedger()
    assert ledger.max_count == 0 and ledger.num_samples == 0
    assert ledger.update(torch.tensor([3, 7, 1])).tolist() == [1, 1, 1]
    assert ledger.update(torch.tensor([7, 10])).tolist() == [2, 1]
    assert ledger.update(torch.tensor([1, 7, 7], dtype=torch.int32)).tolist() == [2, 3, 3]  # one draw: once
    assert ledger.counts(torch.tensor([3, 7, 1, 10, 99])).tolist() == [1, 3, 2, 1, 0]
    assert ledger.num_samples == 4 and ledger.max_count == 3 and ledger.updates == 3
    assert ledger.update([2**40, 3]).tolist() == [1, 2]  # large ids and plain lists
    assert ledger.update(torch.empty(0, dtype=torch.long)).tolist() == []
    out = ledger.update(torch.tensor([3]), batch_size=1)
    assert out.dtype == torch.long and out.tolist() == [3]


def test_ledger_feeds_cumulative_invloss() -> None:
    _, spec = _linear_case(batch=2, seed=11)
    ledger = ReleaseLedger()
    noise = NoiseModel(isotropic=2e-3)
    values = []
    for _ in range(3):
        counts = ledger.update(torch.tensor([5, 6]))
        values.append(cumulative_invloss(spec, noise, counts))
    assert counts.tolist() == [3, 3]
    assert bool((values[0] > values[1]).all()) and bool((values[1] > values[2]).all())


def test_ledger_explicit_count_without_ids() -> None:
    ledger = ReleaseLedger(releases_per_sample=5)
    assert ledger.update(batch_size=3).tolist() == [5, 5, 5]
    assert ledger.update(torch.tensor([1, 2])).tolist() == [5, 5]  # observed 1, explicit 5: the larger
    for _ in range(6):
        ledger.update(torch.tensor([1]))
    assert ledger.counts(torch.tensor([1, 2, 3])).tolist() == [7, 5, 5]
    assert ledger.max_count == 7
    with pytest.raises(ValueError, match="releases_per_sample"):
        ReleaseLedger().update(batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        ledger.update()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="invdefend.cumulative.ReleaseLedger: releases_per_sample"):
            ReleaseLedger(releases_per_sample=bad)


def test_ledger_refuses_bad_ids() -> None:
    ledger = ReleaseLedger()
    cases = [
        (torch.tensor([0.0, 1.0]), "dtype"),
        ([0.5, 1.5], "dtype"),
        (torch.tensor([True, False]), "dtype"),
        (torch.tensor([1, -1]), ">= 0"),
        (torch.tensor([[1, 2]]), "1-D"),
        (torch.tensor(3), "1-D"),
        ("abc", "integer sample ids"),
    ]
    for ids, match in cases:
        with pytest.raises(ValueError, match=f"invdefend.cumulative.ReleaseLedger.update: .*{match}"):
            ledger.update(ids)
    with pytest.raises(ValueError, match="3 ids for a batch of 4"):
        ledger.update(torch.tensor([1, 2, 3]), batch_size=4)
    with pytest.raises(ValueError, match="ReleaseLedger.counts: .*>= 0"):
        ledger.counts(torch.tensor([-5]))
    assert ledger.num_samples == 0 and ledger.updates == 0  # nothing was recorded by a refused update


def test_ledger_state_round_trip_and_bad_state() -> None:
    ledger = ReleaseLedger(releases_per_sample=2)
    for ids in ([4, 2], [2, 9], [2]):
        ledger.update(torch.tensor(ids))
    state = ledger.state_dict()
    other = ReleaseLedger()
    other.load_state_dict(state)
    assert other.releases_per_sample == 2 and other.updates == 3
    assert other.counts(torch.tensor([2, 4, 9, 1])).tolist() == ledger.counts(torch.tensor([2, 4, 9, 1])).tolist()
    other.update(torch.tensor([2]))
    assert ledger.counts(torch.tensor([2])).tolist() == [3]  # the state was copied, not shared
    assert other.counts(torch.tensor([2])).tolist() == [4]
    bad_states = [
        {},
        {**state, "ids": state["ids"].flip(0)},
        {**state, "counts": torch.zeros_like(state["counts"])},
        {**state, "ids": state["ids"].double()},
        {**state, "updates": -1},
        {**state, "releases_per_sample": 0},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError, match="invdefend.cumulative.ReleaseLedger"):
            ReleaseLedger().load_state_dict(bad)


def test_a_prior_whitened_spectrum_goes_through_unchanged() -> None:
    """With a data prior N(μ, C) (invdefend.prior, THEORY §7) the same sufficiency argument holds: T releases
    are one release with noise τ_ref·I + Σ/T, and the Bayes error in pixels is the closed form under C."""
    import invdefend.prior as prior_mod
    from invdefend.spectral import estimate_spectrum

    g = torch.Generator().manual_seed(12)
    d, m, T, rho, iso = 16, 10, 6, 0.02, 2e-3
    t = torch.linspace(0, 1, d, dtype=D64)
    basis = torch.stack([torch.cos(math.pi * f * t) for f in range(6)], dim=1)
    samples = 0.5 + 0.15 * torch.randn(300, 6, generator=g, dtype=D64) @ basis.T
    samples = samples + 0.01 * torch.randn(300, d, generator=g, dtype=D64)
    prior = prior_mod.GaussianPrior.fit(samples, rank=4)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, d, generator=g, dtype=D64))
    op = embedding_jacobian(layer, samples[:1])
    spec = estimate_spectrum(op, d, method="exact", prior=prior)
    W, C = layer.weight.detach(), prior.covariance().to(D64)
    tau_ref = float(reference_noise(spec.signal_norm, m, rho)[0])
    S = W @ C @ W.T + (tau_ref + iso / T) * torch.eye(m, dtype=D64)
    exact = float((C - C @ W.T @ torch.linalg.solve(S, W @ C)).trace()) / d
    got = float(cumulative_invloss(spec, NoiseModel(isotropic=iso, rho=rho), T)[0])
    assert got == pytest.approx(exact, rel=1e-8)


def test_summed_information_over_moving_jacobians_matches_the_dense_posterior():
    from invdefend.cumulative import StackedReleases, summed_invloss
    from invdefend.jacobian import JacobianOperator
    from invdefend.prior import GaussianPrior

    gen = torch.Generator().manual_seed(3)
    d = 10
    x = torch.rand(2, d, dtype=torch.float64, generator=gen)
    Ws = [torch.randn(4, d, dtype=torch.float64, generator=gen) for _ in range(3)]  # the model moves
    taus = [0.05, 0.1, 0.2]
    ops = [JacobianOperator(lambda z, W=W: W @ z, x) for W in Ws]
    info = sum(W.T @ W / t for W, t in zip(Ws, taus))
    v0 = 1 / 12
    want = float(torch.linalg.inv(info + torch.eye(d, dtype=torch.float64) / v0).trace()) / d
    got = summed_invloss(ops, taus, v0=v0, method="exact")
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-9)
    # under a data prior: the same with C⁻¹ in place of I/v0
    samples = torch.rand(200, d, dtype=torch.float64, generator=gen) @ torch.randn(d, d, dtype=torch.float64, generator=gen) * 0.1
    prior = GaussianPrior.fit(samples, rank=4)
    C = prior.covariance()
    want_p = float(torch.linalg.inv(info + torch.linalg.inv(C)).trace()) / d
    got_p = summed_invloss(ops, taus, prior=prior, method="exact")
    assert torch.allclose(got_p, torch.full_like(got_p, want_p), rtol=1e-8)
    # more releases never hurt the attacker; one release is the ordinary InvLoss
    one = summed_invloss(ops[:1], taus[:1], v0=v0, method="exact")
    assert bool((got <= one + 1e-12).all())
    with pytest.raises(ValueError, match="one variance per release"):
        StackedReleases(ops, taus[:2])
