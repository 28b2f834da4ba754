"""The data prior (invdefend.prior) and InvLoss under it, checked against closed forms and Monte-Carlo."""

import math

import pytest
import torch

from invdefend.jacobian import JacobianOperator
from invdefend.prior import GaussianPrior, OnlinePrior
from invdefend.risk import NoiseModel, RiskEstimate, invloss, prior_mean_variance
from invdefend.spectral import estimate_spectrum, exact_spectrum
from invdefend.whitened import WhitenedOperator


def correlated_prior(d: int = 24, rank: int = 6, seed: int = 0) -> GaussianPrior:
    """A prior fitted on smooth correlated samples: far from i.i.d."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, d, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * f * t) for f in range(8)], dim=1)
    coef = torch.randn(400, 8, generator=gen, dtype=torch.float64) / torch.arange(1, 9, dtype=torch.float64)
    x = 0.5 + 0.15 * coef @ basis.T + 0.01 * torch.randn(400, d, generator=gen, dtype=torch.float64)
    return GaussianPrior.fit(x, rank=rank)


def linear_operator(W: torch.Tensor, inputs: torch.Tensor) -> JacobianOperator:
    """``F(x) = tanh-free linear map W x``: its Jacobian is W for every sample."""
    return JacobianOperator(lambda x: W @ x, inputs, name="linear")


def bayes_error(W: torch.Tensor, C: torch.Tensor, tau: float) -> float:
    """Closed-form posterior MSE per coordinate of ``x ~ N(μ, C)`` from ``W x + N(0, τI)``."""
    m = W.shape[0]
    S = W @ C @ W.T + tau * torch.eye(m, dtype=W.dtype)
    post = C - C @ W.T @ torch.linalg.solve(S, W @ C)
    return float(post.trace()) / C.shape[0]


def test_square_root_precision_and_whitening_are_exact():
    prior = correlated_prior()
    C = prior.covariance()
    eye = torch.eye(prior.dim, dtype=torch.float64)
    A = prior.sqrt_apply(eye).T
    assert torch.allclose(A @ A.T, C, atol=1e-12)
    assert torch.allclose(prior.sqrt_t_apply(eye).T, A.T, atol=1e-12)
    assert torch.allclose(prior.precision_apply(eye), torch.linalg.inv(C), rtol=1e-8, atol=1e-8)
    z = torch.randn(3, prior.dim, dtype=torch.float64)
    assert torch.allclose(prior.whiten(prior.color(z)), z, atol=1e-10)
    assert prior.trace == pytest.approx(float(C.trace()))


def test_fit_keeps_the_sample_variance_and_concentrates_it():
    gen = torch.Generator().manual_seed(1)
    x = 0.2 * torch.rand(200, 2, 4, 4, generator=gen, dtype=torch.float64)
    x = x + torch.rand(200, 1, 1, 1, generator=gen, dtype=torch.float64)  # a shared brightness: one strong direction
    prior = GaussianPrior.fit(x, rank=3)
    sample_var = x.reshape(200, -1).var(dim=0)
    assert torch.allclose(prior.covariance().diagonal(), sample_var, rtol=1e-10)
    assert prior.explained_fraction(1) > 0.8
    assert prior.sample_shape == (2, 4, 4)


def test_iid_prior_reproduces_the_iid_invloss():
    torch.manual_seed(0)
    W = torch.randn(10, 16, dtype=torch.float64)
    x = torch.rand(2, 16, dtype=torch.float64)
    op = linear_operator(W, x)
    noise = NoiseModel(isotropic=0.3, rho=0.0)
    plain = invloss(exact_spectrum(op), noise, v0=1 / 12)
    whitened = invloss(estimate_spectrum(op, 10, method="exact", prior=GaussianPrior.iid((16,), 1 / 12).to(torch.float64)), noise)
    assert torch.allclose(plain, whitened, rtol=1e-10)


@pytest.mark.parametrize("m", [6, 30])
def test_exact_prior_invloss_matches_the_closed_form(m):
    prior = correlated_prior()
    W = torch.randn(m, prior.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    x = prior.sample(2, torch.Generator().manual_seed(3))
    tau = 0.05
    spec = estimate_spectrum(linear_operator(W, x), 64, method="exact", prior=prior)
    assert spec.whitened and spec.complete
    got = invloss(spec, NoiseModel(isotropic=tau, rho=0.0))
    want = bayes_error(W, prior.covariance(), tau)
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-9)
    # the i.i.d. model with the same average variance is a different (and here larger) number
    iid = invloss(exact_spectrum(linear_operator(W, x)), NoiseModel(isotropic=tau, rho=0.0), v0=prior.mean_variance)
    assert float(iid[0]) > 1.2 * want


def test_prior_invloss_is_the_monte_carlo_error_of_the_bayes_estimator():
    prior = correlated_prior()
    d = prior.dim
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(8, d, dtype=torch.float64, generator=gen)
    tau = 0.02
    C, mu = prior.covariance(), prior.mean
    n = 40_000
    x = prior.sample(n, gen)
    y = x @ W.T + math.sqrt(tau) * torch.randn(n, 8, generator=gen, dtype=torch.float64)
    gain = C @ W.T @ torch.linalg.inv(W @ C @ W.T + tau * torch.eye(8, dtype=torch.float64))
    x_hat = mu + (y - mu @ W.T) @ gain.T
    mse = float((x - x_hat).pow(2).mean())
    spec = estimate_spectrum(linear_operator(W, x[:1]), 8, method="exact", prior=prior)
    predicted = float(invloss(spec, NoiseModel(isotropic=tau, rho=0.0))[0])
    assert predicted == pytest.approx(mse, rel=0.02)


def test_topk_with_weighted_quadrature_tracks_exact_and_topk_alone_is_conservative():
    prior = correlated_prior(d=48, rank=10)
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(40, prior.dim, dtype=torch.float64, generator=gen) * torch.logspace(0, -3, 40, dtype=torch.float64).unsqueeze(1)
    x = prior.sample(3, gen)
    op = linear_operator(W, x)
    noise = NoiseModel(isotropic=1e-3, rho=0.0)
    exact = invloss(estimate_spectrum(op, 64, method="exact", prior=prior), noise)
    est = estimate_spectrum(op, 6, method="subspace", tail=True, slq_probes=64, slq_steps=30, prior=prior,
                            generator=torch.Generator().manual_seed(0))
    assert not est.complete
    slq = invloss(est, noise, tail="slq")
    topk = invloss(est, noise, tail="topk")
    assert torch.allclose(slq, exact, rtol=0.15)
    assert bool((topk <= exact * (1 + 1e-9)).all())  # never says safer than the truth


def test_leakage_is_relative_to_the_data_prior():
    prior = correlated_prior()
    W = torch.randn(5, prior.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = estimate_spectrum(linear_operator(W, prior.sample(1)), 8, method="exact", prior=prior)
    silent = RiskEstimate.from_spectrum(spec, NoiseModel(isotropic=1e12, rho=0.0))
    assert prior_mean_variance(spec) == pytest.approx(prior.mean_variance)
    assert float(silent.invloss[0]) == pytest.approx(prior.mean_variance, rel=1e-6)
    assert float(silent.leakage[0]) == pytest.approx(0.0, abs=1e-6)


def test_whitened_operator_is_j_times_the_root():
    prior = correlated_prior()
    W = torch.randn(7, prior.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op = WhitenedOperator(linear_operator(W, prior.sample(2)), prior)
    A = prior.sqrt_apply(torch.eye(prior.dim, dtype=torch.float64)).T
    assert torch.allclose(op.dense()[0], W @ A, atol=1e-12)
    V = torch.randn(2, prior.dim, 3, dtype=torch.float64)
    assert torch.allclose(op.matvec(V), (W @ A) @ V, atol=1e-12)
    U = torch.randn(2, 7, 3, dtype=torch.float64)
    assert torch.allclose(op.rmatvec(U), (W @ A).T @ U, atol=1e-12)


def test_bad_priors_are_refused_clearly():
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianPrior.fit(torch.rand(1, 4))
    with pytest.raises(ValueError, match="convert to float"):
        GaussianPrior.fit(torch.randint(0, 255, (5, 4), dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        GaussianPrior.fit(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="rank"):
        GaussianPrior.fit(torch.rand(5, 4), rank=-1)
    prior = GaussianPrior.iid((3, 4))
    W = torch.randn(2, 5)
    with pytest.raises(ValueError, match="same shape"):
        WhitenedOperator(linear_operator(W, torch.rand(1, 5)), prior)


def test_online_prior_waits_for_data_then_fits_past_batches_only():
    online = OnlinePrior(rank=2, capacity=50, min_samples=20, refit_every=10)
    gen = torch.Generator().manual_seed(0)
    assert online.prior() is None
    for _ in range(3):
        online.update(torch.rand(8, 3, 2, 2, generator=gen))
    fitted = online.prior()
    assert fitted is not None and fitted.sample_shape == (3, 2, 2) and online.seen == 24
    assert online.prior() is fitted  # not refitted before refit_every new samples
    for _ in range(10):
        online.update(torch.rand(8, 3, 2, 2, generator=gen))
    assert online.prior() is not fitted and online.stored == 50 and online.seen == 104
    with pytest.raises(ValueError, match="one OnlinePrior per input shape"):
        online.update(torch.rand(2, 5))


def test_state_round_trip():
    prior = correlated_prior()
    again = GaussianPrior.from_state(prior.state_dict())
    assert torch.equal(again.covariance(), prior.covariance())


def test_conditional_invloss_is_the_bayes_error_on_this_sample_and_averages_to_invloss():
    from invdefend.conditional import conditional_invloss, estimate_conditional

    prior = correlated_prior(d=24, rank=6)
    d = prior.dim
    gen = torch.Generator().manual_seed(11)
    W = torch.randn(9, d, dtype=torch.float64, generator=gen)
    tau = 0.03
    C, mu = prior.covariance(), prior.mean
    x = prior.sample(3, gen)
    noise = NoiseModel(isotropic=tau, rho=0.0)
    # exact spectrum, and a top-k estimate with quadrature and the Lanczos rule
    exact = estimate_conditional(linear_operator(W, x), 64, method="exact", prior=prior)
    est = estimate_conditional(linear_operator(W, x), 4, method="subspace", tail=True, slq_probes=64, slq_steps=24,
                               prior=prior, generator=torch.Generator().manual_seed(0))
    gain = C @ W.T @ torch.linalg.inv(W @ C @ W.T + tau * torch.eye(9, dtype=torch.float64))
    n = 20_000
    for b in range(3):
        eps = math.sqrt(tau) * torch.randn(n, 9, generator=gen, dtype=torch.float64)
        x_hat = mu + (x[b] @ W.T + eps - mu @ W.T) @ gain.T
        mc = float((x_hat - x[b]).pow(2).mean())
        closed = float(((torch.eye(d, dtype=torch.float64) - gain @ W) @ (x[b] - mu)).pow(2).sum()
                       + (gain @ gain.T).trace() * tau) / d
        assert mc == pytest.approx(closed, rel=0.02)
        assert float(conditional_invloss(exact, noise)[b]) == pytest.approx(closed, rel=1e-8)
        assert float(conditional_invloss(est, noise)[b]) == pytest.approx(closed, rel=0.1)
    # averaged over samples from the prior it is InvLoss
    many = prior.sample(3000, gen)
    spec = estimate_conditional(linear_operator(W, many), 64, method="exact", prior=prior)
    assert float(conditional_invloss(spec, noise).mean()) == pytest.approx(float(invloss(spec, noise)[0]), rel=0.03)


def test_conditional_invloss_needs_a_rule():
    from invdefend.conditional import conditional_invloss

    W = torch.randn(3, 5, dtype=torch.float64)
    spec = exact_spectrum(linear_operator(W, torch.rand(1, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="no sample rule"):
        conditional_invloss(spec)


def test_randomized_fit_matches_the_exact_fit_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(3)
    d, n = 300, 500
    scales = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)  # variances 1/i²: a decaying spectrum
    rot = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    x = 0.5 + (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ rot.T
    exact = GaussianPrior.fit(x, rank=12)
    fast = GaussianPrior.fit(x, rank=12, method="randomized")
    assert torch.allclose(fast.variances, exact.variances, rtol=0.02)
    overlap = torch.linalg.svdvals(exact.basis.T @ fast.basis)  # cosines of the principal angles
    assert float(overlap[:10].min()) > 0.99
    assert torch.allclose(fast.basis.T @ fast.basis, torch.eye(12, dtype=torch.float64), atol=1e-5)  # float32 fit
    # the diagonal still completes the sample variance, so the two priors agree on the total
    assert float((fast.covariance().diagonal() - exact.covariance().diagonal()).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="method"):
        GaussianPrior.fit(x, rank=4, method="svd")


def test_online_prior_refits_on_reservoir_changes_and_thins_out():
    online = OnlinePrior(rank=2, capacity=40, min_samples=20, refit_every=20)
    gen = torch.Generator().manual_seed(1)
    fits = []
    for _ in range(200):
        online.update(torch.rand(8, 5, generator=gen))
        online.prior()
        fits.append(online.fits)
    assert online.seen == 1600 and online.stored == 40
    assert fits[2] == fits[4] == 1 and fits[7] >= 2  # 24 seen: first fit; none before 20 more entries change
    early, late = fits[49] - fits[0], fits[-1] - fits[149]  # steps 0–49 against the last 50
    assert early > 3 * late >= 3  # a sample enters with probability capacity/seen: refits thin out
    # the reservoir stays a uniform sample of everything seen: batch t holds the value t, t = 0..99, so the
    # fitted mean and variance are those of U{0..99} (49.5 and 833.25), not of the recent batches
    stream = OnlinePrior(rank=0, capacity=400, min_samples=2, seed=5)
    for t in range(100):
        stream.update(torch.full((40, 1), float(t)))
    held = stream.prior()
    assert held is not None and abs(float(held.mean[0]) - 49.5) < 5.0
    assert float(held.diagonal[0]) == pytest.approx(833.25, rel=0.15)
