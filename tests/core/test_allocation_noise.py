"""Water-filling optimality and target mode (allocation), band-pass noise covariance (placements.band_pass)
and noise sources (noise)."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from invdefend.jacobian import embedding_jacobian
from invdefend.allocation import water_filling, water_filling_for_target
from invdefend.noise import SecureNoise, SeededNoise, shaped_noise
from invdefend.placements.band_pass import band_pass_noise
from invdefend.spectral import exact_spectrum

V0 = 1.0 / 12


def _objective(s: np.ndarray, tau: np.ndarray, base: float) -> float:
    return float(np.sum(V0 * (base + tau) / (base + tau + V0 * s**2)))


def test_water_filling_spends_the_energy_and_satisfies_kkt():
    s = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.5, 0.1]], dtype=torch.float64)
    base = 1e-3
    tau = water_filling(s, 0.8, V0, base)[0]
    assert float(tau.sum()) == pytest.approx(0.8, rel=1e-9)
    grad = V0**2 * s[0] ** 2 / (base + tau + V0 * s[0] ** 2) ** 2  # d objective / d tau_i
    active = tau > 1e-12
    lam = grad[active]
    assert float(lam.max() - lam.min()) / float(lam.mean()) < 1e-6, "equal marginal gain on active directions"
    assert (grad[~active] <= lam.mean() * (1 + 1e-6)).all(), "inactive directions gain less"


def test_water_filling_matches_a_generic_optimiser_and_beats_even_spreading():
    rng = np.random.default_rng(0)
    s = np.sort(rng.uniform(0.05, 4.0, 12))[::-1].copy()
    energy, base = 0.5, 1e-4
    tau = water_filling(torch.tensor(s[None]), energy, V0, base)[0].numpy()
    res = minimize(lambda t: -_objective(s, t, base), np.full(12, energy / 12), method="SLSQP",
                   bounds=[(0, None)] * 12, constraints=[{"type": "eq", "fun": lambda t: t.sum() - energy}],
                   options={"ftol": 1e-14, "maxiter": 500})
    assert _objective(s, tau, base) >= -res.fun - 1e-9
    assert _objective(s, tau, base) > _objective(s, np.full(12, energy / 12), base)


def test_water_filling_places_noise_on_the_weakest_directions_first():
    s = torch.tensor([[4.0, 2.0, 1.0, 0.5]], dtype=torch.float64)
    small = water_filling(s, 1e-3, V0)[0]
    assert small[-1] > 0 and small[0] == 0


def test_water_filling_rejects_bad_energy():
    with pytest.raises(ValueError, match="energy"):
        water_filling(torch.ones(1, 3), -1.0, V0)
    with pytest.raises(ValueError, match="energy"):
        water_filling(torch.ones(1, 3), float("nan"), V0)


def test_target_mode_finds_the_smallest_energy():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.2]], dtype=torch.float64)
    d = 5

    def il_of(tau: torch.Tensor) -> torch.Tensor:
        return (V0 * tau / (tau + V0 * s**2)).sum(-1) / d

    target = 0.6 * V0
    tau, reached = water_filling_for_target(s, il_of, target, V0, max_energy=100.0)
    assert bool(reached[0]) and float(il_of(tau)[0]) >= target
    less = water_filling(s, 0.99 * float(tau.sum()), V0)
    assert float(il_of(less)[0]) < target
    _, unreachable = water_filling_for_target(s, il_of, 0.6 * V0, V0, max_energy=1e-6)
    assert not bool(unreachable[0])


def test_shaped_noise_has_the_allocated_variances():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64)).Q
    tau = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    src = SeededNoise(seed=1)
    draws = torch.stack([shaped_noise(U, tau, src) for _ in range(20000)])
    coords = draws @ U
    torch.testing.assert_close(coords.var(0), tau, rtol=0.05, atol=1e-3)
    outside = draws - coords @ U.T
    assert float(outside.abs().max()) < 1e-10


def test_band_pass_noise_covariance_matches_the_matrix_function():
    torch.manual_seed(0)
    d, m = 8, 12
    A = torch.randn(m, d, dtype=torch.float64) * torch.logspace(0.5, -1, d, dtype=torch.float64)
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(A)
    op = embedding_jacobian(layer, torch.zeros(500, d, dtype=torch.float64))  # 500 draws per call
    spec = exact_spectrum(op.subset([0]))
    s2 = spec.singular_values[0] ** 2
    mu = float(s2.median())
    src = SeededNoise(seed=3)
    draws = torch.cat([band_pass_noise(op, mu, 1.0, src, steps=d) for _ in range(16)])
    var = (draws @ spec.left_vectors[0]).var(0)
    expected = s2 / (s2 + mu) ** 2
    torch.testing.assert_close(var, expected, rtol=0.08, atol=1e-6)
    assert int(var.argmax()) == int((s2 - mu).abs().argmin())


def _rank_deficient_linear(d: int = 16, m: int = 24, rank: int = 13, batch: int = 400):
    """``op`` of a linear map (the same ``J`` for each of ``batch`` samples) and J's non-zero ``s²``, sorted."""
    torch.manual_seed(1)
    A = torch.randn(m, d, dtype=torch.float64) * torch.logspace(0.5, -1, d, dtype=torch.float64)
    A[:, rank:] = 0
    layer = nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(A)
    s2 = torch.linalg.svdvals(A).pow(2)
    return embedding_jacobian(layer, torch.zeros(batch, d, dtype=torch.float64)), s2[s2 > 1e-10 * s2.max()].sort().values


@pytest.mark.parametrize("q", [0.25, 0.75])
def test_band_pass_noise_chooses_mu_at_the_quantile_of_the_nonzero_spectrum(q):
    op, nz = _rank_deficient_linear()
    d = op.in_dim
    delta, mu = band_pass_noise(op, None, 1.0, SeededNoise(seed=2), steps=d, mu_quantile=q, return_mu=True)
    assert delta.shape == (op.batch_size, op.out_dim) and mu.shape == (op.batch_size,)
    # steps = d: the Ritz values are exact eigenvalues, so every μ is one of the non-zero s² (never a zero one).
    gap = (mu.unsqueeze(1) - nz).abs().min(dim=1).values
    assert float(gap.max()) <= 1e-8 * float(nz.max())
    # One random start vector weighs the eigenvalues by (u_iᵀw)²/‖w‖², not 1/d: each μ is a noisy estimate,
    # whose median over many draws sits within one eigenvalue of the exact quantile.
    exact = float(torch.quantile(nz, q))
    med_rank = int((nz - mu.median()).abs().argmin())
    exact_rank = int((nz - exact).abs().argmin())
    assert abs(med_rank - exact_rank) <= 1, (float(mu.median()), exact)
    # The μ it chose is the μ it used: the same draw with that μ passed explicitly is the same noise.
    again = band_pass_noise(op, mu, 1.0, SeededNoise(seed=2), steps=d)
    torch.testing.assert_close(again, delta, rtol=1e-10, atol=1e-12)


def test_band_pass_noise_rejects_a_bad_quantile():
    op, _ = _rank_deficient_linear(batch=2)
    for q in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mu_quantile"):
            band_pass_noise(op, None, 1.0, SeededNoise(seed=0), mu_quantile=q)


def test_seeded_noise_is_reproducible_and_checkpointable():
    a, b = SeededNoise(seed=5), SeededNoise(seed=5)
    assert torch.equal(a.normal((3,), torch.float32, torch.device("cpu")), b.normal((3,), torch.float32, torch.device("cpu")))
    state = a.state_dict()
    x = a.normal((4,), torch.float64, torch.device("cpu"))
    a.load_state_dict(state)
    assert torch.equal(x, a.normal((4,), torch.float64, torch.device("cpu")))


def test_secure_noise_is_gaussian_and_not_reproducible():
    with pytest.warns(UserWarning, match="NOT reproducible"):
        src = SecureNoise()
    x = src.normal((200000,), torch.float64, torch.device("cpu"))
    y = src.normal((200000,), torch.float64, torch.device("cpu"))
    assert not torch.equal(x, y)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert abs(float(((x - x.mean()) ** 4).mean() / x.var() ** 2) - 3) < 0.1  # Gaussian kurtosis


def test_noise_sources_follow_their_seed_or_generator():
    from invdefend.noise import make_noise_source

    a = make_noise_source(seed=3).normal((5,), torch.float64, torch.device("cpu"))
    b = SeededNoise(seed=3).normal((5,), torch.float64, torch.device("cpu"))
    c = make_noise_source(seed=4).normal((5,), torch.float64, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(9)
    d = make_noise_source(generator=gen).normal((5,), torch.float64, torch.device("cpu"))
    assert torch.equal(d, torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64))


def test_secure_noise_angle_is_uniform():
    """Box–Muller: the pairs' angles are uniform on the circle and the radii Rayleigh (mean √(π/2))."""
    with pytest.warns(UserWarning):
        z = SecureNoise().normal((40000,), torch.float64, torch.device("cpu"))
    x, y = z[:20000], z[20000:]
    angle = torch.atan2(y, x)
    hist = torch.histc(angle, bins=8, min=-math.pi, max=math.pi) / 20000
    assert torch.allclose(hist, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)
    assert float(torch.sqrt(x**2 + y**2).mean()) == pytest.approx(math.sqrt(math.pi / 2), rel=0.02)


def test_placement_variances_sum_to_each_rows_energy():
    from invdefend.allocation import placement_variances

    s = torch.tensor([[3.0, 2.0, 1.0, 0.5], [4.0, 1.0, 0.3, 0.0]], dtype=torch.float64)
    energy = torch.tensor([2.0, 0.5], dtype=torch.float64)
    for placement in ("weak25", "band_pass"):
        tau = placement_variances(s, energy, placement)
        assert torch.allclose(tau.sum(dim=1), energy), placement
        assert float(tau[1, 3]) == 0.0  # outside range(J): no noise
    weak = placement_variances(s, energy, "weak25", fraction=0.5)
    assert torch.equal(weak[0] > 0, torch.tensor([False, False, True, True]))
    with pytest.raises(ValueError, match="percentile=100"):
        placement_variances(s, energy, "band_pass", percentile=100.0)


def test_water_filling_uses_each_samples_own_base_noise():
    s = torch.tensor([[3.0, 1.0, 0.3], [3.0, 1.0, 0.3]], dtype=torch.float64)
    base = torch.tensor([1e-4, 5e-2], dtype=torch.float64)
    both = water_filling(s, 0.5, V0, base)
    for b in range(2):
        alone = water_filling(s[b : b + 1], 0.5, V0, float(base[b]))
        assert torch.allclose(both[b], alone[0], rtol=1e-10)
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="v0=0"):
        water_filling(s, 0.5, 0.0)


def test_target_mode_handles_rows_that_reach_and_rows_that_do_not():
    from invdefend.risk import invloss_from_values

    s = torch.tensor([[3.0, 1.0], [300.0, 100.0]], dtype=torch.float64)

    def il_of(tau):
        return invloss_from_values(s, tau, in_dim=2, v0=V0)

    tau, reached = water_filling_for_target(s, il_of, 0.03, V0, max_energy=1.0)
    assert reached.tolist() == [True, False]
    assert float(il_of(tau)[0]) == pytest.approx(0.03, rel=1e-6)
    assert torch.allclose(tau[1], water_filling(s[1:], 1.0, V0)[0])


def _weighted_objective(st: np.ndarray, w: np.ndarray, tau: np.ndarray, base: float) -> float:
    return float(np.sum(w * (base + tau) / (base + tau + st**2)))


def test_weighted_water_filling_maximises_the_pixel_error_under_a_prior():
    """THEORY §8.5: on a whitened spectrum s̃ with pixel weights w, τ_i = (s̃_i(c√w_i − s̃_i) − b)_+ maximises
    Σ w_i (b+τ_i)/(b+τ_i+s̃_i²) at fixed energy — checked against a generic optimiser, and it differs from
    (beats) the unweighted allocation when the weights differ."""
    rng = np.random.default_rng(3)
    st = np.sort(rng.uniform(0.05, 3.0, 10))[::-1].copy()
    w = rng.uniform(0.01, 2.0, 10)
    energy, base = 0.7, 1e-4
    tau = water_filling(torch.tensor(st[None]), energy, 1.0, base, weights=torch.tensor(w[None]))[0].numpy()
    assert tau.sum() == pytest.approx(energy, rel=1e-9) and (tau >= 0).all()
    res = minimize(lambda t: -_weighted_objective(st, w, t, base), np.full(10, energy / 10), method="SLSQP",
                   bounds=[(0, None)] * 10, constraints=[{"type": "eq", "fun": lambda t: t.sum() - energy}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    assert _weighted_objective(st, w, tau, base) >= -res.fun - 1e-9
    plain = water_filling(torch.tensor(st[None]), energy, 1.0, base)[0].numpy()
    assert _weighted_objective(st, w, tau, base) > _weighted_objective(st, w, plain, base) + 1e-4
    # KKT: equal marginal gain w s̃²/(b+τ+s̃²)² on the directions that get noise
    grad = w * st**2 / (base + tau + st**2) ** 2
    active = tau > 1e-12
    assert np.ptp(grad[active]) / grad[active].mean() < 1e-6
    assert (grad[~active] <= grad[active].mean() * (1 + 1e-6)).all()


def test_weighted_water_filling_with_constant_weights_is_the_iid_form():
    s = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.5]], dtype=torch.float64)
    # i.i.d. prior v0 in pixel units == whitened s̃ = √v0·s with every weight v0
    iid = water_filling(s, 0.3, V0, 1e-3)
    weighted = water_filling(s, 0.3, V0, 1e-3, weights=torch.full_like(s, V0))
    assert torch.allclose(iid, weighted, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="weights"):
        water_filling(s, 0.3, V0, weights=torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        water_filling(s, 0.3, V0, weights=-torch.ones_like(s))


@pytest.mark.parametrize("weighted", [False, True])
def test_water_filling_skips_directions_outside_the_range(weighted: bool):
    """A zero singular value (a dead ReLU path, a direction past the rank) carries nothing to hide: it gets no
    noise and does not poison the water level (it once turned the whole plan into NaN)."""
    s = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 1.0, 0.7, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64) if weighted else None
    tau = water_filling(s, 0.4, 1.0, 1e-6, weights=w)
    assert torch.isfinite(tau).all()
    assert float(tau[0].sum()) == pytest.approx(0.4, rel=1e-9) and float(tau[0, 2:].abs().max()) == 0.0
    assert float(tau[1].abs().max()) == 0.0  # nothing in range: nothing shaped (the floor is the caller's)
