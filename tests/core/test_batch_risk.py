"""Batch-aware per-sample risk of a batch-mean gradient (invdefend.batch_risk), checked against the dense
joint posterior covariance (Schur complement) built by hand on tiny float64 MLPs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from invdefend.batch_risk import (
    BatchMeanOperator,
    BlockWhitenedOperator,
    batch_invloss,
    batch_invloss_from_operator,
)
from invdefend.invre import estimate_gradient_spectrum
from invdefend.jacobian import JacobianOperator, gradient_jacobian
from invdefend.models import MLP
from invdefend.prior import GaussianPrior
from invdefend.risk import NoiseModel, invloss
from invdefend.spectral import estimate_spectrum

torch.set_num_threads(1)


def tiny_case(d: int = 8, B: int = 3, hidden: int = 6, classes: int = 3, seed: int = 0):
    """A float64 tanh MLP, a batch of ``B`` inputs in [0, 1]^d and labels."""
    torch.manual_seed(seed)
    model = MLP(d, hidden=(hidden,), out_features=classes, activation="tanh").double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(B, d, generator=gen, dtype=torch.float64)
    y = torch.arange(B) % classes
    return model, x, y


def correlated_prior(d: int, rank: int = 4, seed: int = 0) -> GaussianPrior:
    """A prior fitted on smooth correlated synthetic samples (far from i.i.d.)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, d, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * f * t) for f in range(5)], dim=1)
    coef = torch.randn(300, 5, generator=gen, dtype=torch.float64) / torch.arange(1, 6, dtype=torch.float64)
    x = 0.5 + 0.15 * coef @ basis.T + 0.02 * torch.randn(300, d, generator=gen, dtype=torch.float64)
    return GaussianPrior.fit(x, rank=rank)


def joint_jacobian(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: the mean gradient of the WHOLE batch as a function of all inputs, ``(m, B·d)``, and its value."""
    params = [p for p in model.parameters()]

    def mean_gradient(X: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(X), y)  # mean over the batch
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    J = torch.autograd.functional.jacobian(mean_gradient, x)  # (m, B, d)
    return J.reshape(J.shape[0], -1), mean_gradient(x).detach()


def dense_reference(model, x, y, C: torch.Tensor, sigma2: float, rho: float) -> dict[str, torch.Tensor]:
    """Per-sample posterior MSE from the joint posterior covariance (two ways) and the conservative one."""
    B, d = x.shape
    J, g = joint_jacobian(model, x, y)
    m = J.shape[0]
    tau = sigma2 + (rho * float(g.norm())) ** 2 / m
    CX = torch.block_diag(*[C] * B)
    Lam = torch.linalg.inv(CX) + J.T @ J / tau
    post = torch.linalg.inv(Lam)
    aware, schur, cons, own = [], [], [], []
    Cinv = torch.linalg.inv(C)
    for b in range(B):
        sl = slice(b * d, (b + 1) * d)
        rest = torch.cat([torch.arange(0, b * d), torch.arange((b + 1) * d, B * d)])
        aware.append(post[sl, sl].trace() / d)
        S = Lam[sl, sl] - Lam[sl][:, rest] @ torch.linalg.solve(Lam[rest][:, rest], Lam[rest][:, sl])
        schur.append(torch.linalg.inv(S).trace() / d)
        Jb = B * J[:, sl]  # the sample's own per-sample gradient Jacobian
        cons.append(torch.linalg.inv(Cinv + Jb.T @ Jb / (B**2 * tau)).trace() / d)
        gb = torch.autograd.grad(F.cross_entropy(model(x[b : b + 1]), y[b : b + 1]), list(model.parameters()))
        tau_b = B**2 * sigma2 + (rho * float(torch.cat([t.reshape(-1) for t in gb]).norm())) ** 2 / m
        own.append(torch.linalg.inv(Cinv + Jb.T @ Jb / tau_b).trace() / d)
    return {k: torch.stack(v) for k, v in {"aware": aware, "schur": schur, "cons": cons, "own": own}.items()}


@pytest.mark.parametrize("B", [2, 4])
def test_iid_batch_aware_risk_is_the_dense_schur_complement(B):
    model, x, y = tiny_case(d=8, B=B)
    sigma2, rho, v0 = 2e-4, 1e-3, 1 / 12
    ref = dense_reference(model, x, y, v0 * torch.eye(8, dtype=torch.float64), sigma2, rho)
    assert torch.allclose(ref["aware"], ref["schur"], rtol=1e-8)  # the block of the inverse = Schur complement
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=sigma2, rho=rho), v0=v0,
                         method="exact")
    assert risk.tail == {"batch_aware": "exact", "conservative": "exact"}
    assert torch.allclose(risk.invloss_batch_aware, ref["aware"], rtol=1e-7)
    assert torch.allclose(risk.invloss_conservative, ref["cons"], rtol=1e-7)
    assert torch.allclose(risk.invloss_conservative_own_reference, ref["own"], rtol=1e-7)
    assert bool((risk.invloss_batch_aware >= risk.invloss_conservative).all())
    assert bool((risk.psnr_gap >= 0).all()) and float(risk.psnr_gap.mean()) > 0.5  # a real difference here


def test_prior_batch_aware_risk_is_the_dense_schur_complement():
    d, B = 10, 3
    model, x, y = tiny_case(d=d, B=B, hidden=5, seed=3)
    prior = correlated_prior(d)
    sigma2, rho = 1e-4, 1e-3
    ref = dense_reference(model, x, y, prior.covariance(), sigma2, rho)
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=sigma2, rho=rho), prior=prior,
                         method="exact")
    assert torch.allclose(risk.invloss_batch_aware, ref["aware"], rtol=1e-7)
    assert torch.allclose(risk.invloss_conservative, ref["cons"], rtol=1e-7)
    assert bool((risk.invloss_batch_aware >= risk.invloss_conservative).all())
    assert bool((risk.invloss_batch_aware <= prior.mean_variance * (1 + 1e-9)).all())
    assert torch.allclose(risk.leakage_batch_aware, 1 - risk.invloss_batch_aware / prior.mean_variance)
    # the i.i.d. prior of the same mean variance prices the same batch differently
    iid = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=sigma2, rho=rho),
                        v0=prior.mean_variance, method="exact")
    assert not torch.allclose(iid.invloss_batch_aware, risk.invloss_batch_aware, rtol=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_prior", [False, True])
def test_others_unknown_never_raise_the_risk(seed, use_prior):
    d, B = 8, 3 + seed % 2
    model, x, y = tiny_case(d=d, B=B, seed=10 + seed)
    prior = correlated_prior(d, seed=seed) if use_prior else None
    for sigma2, rho in [(0.0, 1e-3), (1e-3, 1e-3), (1e-5, 0.0)]:
        risk = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=sigma2, rho=rho), prior=prior,
                             method="exact")
        assert bool((risk.invloss_batch_aware >= risk.invloss_conservative * (1 - 1e-9)).all()), (sigma2, rho)


@pytest.mark.parametrize("use_prior", [False, True])
def test_a_batch_of_one_is_the_per_sample_risk(use_prior):
    d = 8
    model, x, y = tiny_case(d=d, B=1, seed=5)
    prior = correlated_prior(d) if use_prior else None
    noise = NoiseModel(isotropic=3e-4, rho=1e-3)
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=noise, prior=prior, method="exact")
    op = gradient_jacobian(model, F.cross_entropy, x, y)
    today = invloss(estimate_spectrum(op, 64, method="exact", prior=prior), noise, v0=None if use_prior else 1 / 12)
    assert torch.allclose(risk.invloss_batch_aware, today, rtol=1e-9)
    assert torch.allclose(risk.invloss_conservative, today, rtol=1e-9)
    assert torch.allclose(risk.invloss_conservative_own_reference, today, rtol=1e-9)


def test_a_batch_of_one_matches_invre_on_the_estimated_path_too():
    """Top-k + quadrature, B = 1: the same random start and probes as estimate_gradient_spectrum."""
    model, x, y = tiny_case(d=12, B=1, hidden=16, seed=6)
    noise = NoiseModel(isotropic=1e-5, rho=1e-3)
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=noise, k=3, method="subspace", slq_probes=8, seed=4)
    spec = estimate_gradient_spectrum(model, F.cross_entropy, x, y, k=3, method="subspace", tail=True, slq_probes=8,
                                      generator=torch.Generator().manual_seed(4))
    today = invloss(spec, noise, v0=1 / 12, tail="slq")
    assert risk.tail == {"batch_aware": "slq", "conservative": "slq"}
    assert torch.allclose(risk.invloss_batch_aware, today, rtol=1e-6)
    assert torch.allclose(risk.invloss_conservative, today, rtol=1e-9)


@pytest.mark.parametrize("use_prior", [False, True])
def test_topk_with_block_quadrature_tracks_exact_and_topk_alone_is_conservative(use_prior):
    d, B = 12, 3
    model, x, y = tiny_case(d=d, B=B, hidden=16, seed=7)
    prior = correlated_prior(d, rank=5) if use_prior else None
    noise = NoiseModel(isotropic=1e-6, rho=1e-3)
    exact = batch_invloss(model, F.cross_entropy, x, y, noise=noise, prior=prior, method="exact")
    common = {"noise": noise, "prior": prior, "k": 3, "method": "subspace", "slq_probes": 48, "slq_steps": 30,
              "seed": 1}
    slq = batch_invloss(model, F.cross_entropy, x, y, tail="slq", **common)
    topk = batch_invloss(model, F.cross_entropy, x, y, tail="topk", **common)
    assert slq.tail["batch_aware"] == "slq" and topk.tail["batch_aware"] == "topk"
    assert not slq.joint_spectrum.complete and slq.joint_spectrum.k == 9
    assert torch.allclose(slq.invloss_batch_aware, exact.invloss_batch_aware, rtol=0.15)
    assert bool((topk.invloss_batch_aware <= exact.invloss_batch_aware * (1 + 1e-9)).all())
    repriced = slq.with_noise(noise, tail="topk")  # the same spectra, the conservative tail
    assert repriced.tail["batch_aware"] == "topk"
    assert torch.allclose(repriced.invloss_batch_aware, topk.invloss_batch_aware, rtol=1e-6)


def test_the_joint_operator_is_the_jacobian_of_the_whole_batch():
    d, B = 8, 3
    model, x, y = tiny_case(d=d, B=B)
    J, g = joint_jacobian(model, x, y)
    joint = BatchMeanOperator(gradient_jacobian(model, F.cross_entropy, x, y))
    assert (joint.batch_size, joint.in_dim, joint.out_dim) == (1, B * d, J.shape[0])
    assert torch.allclose(joint.dense()[0], J, atol=1e-12)
    assert torch.allclose(joint.values()[0], g, atol=1e-12)
    V = torch.randn(1, B * d, 2, dtype=torch.float64)
    U = torch.randn(1, J.shape[0], 2, dtype=torch.float64)
    assert torch.allclose(joint.matvec(V)[0], J @ V[0], atol=1e-12)
    assert torch.allclose(joint.rmatvec(U)[0], J.T @ U[0], atol=1e-12)
    prior = correlated_prior(d)
    white = BlockWhitenedOperator(joint, prior)
    A = prior.sqrt_apply(torch.eye(d, dtype=torch.float64)).T
    AX = torch.block_diag(*[A] * B)
    assert torch.allclose(white.dense()[0], J @ AX, atol=1e-12)
    assert torch.allclose(white.matvec(V)[0], J @ AX @ V[0], atol=1e-12)
    assert torch.allclose(white.rmatvec(U)[0], (J @ AX).T @ U[0], atol=1e-12)
    W = white.block_weights(V)
    assert torch.allclose(W[1], (A @ V[0, d : 2 * d]).pow(2).sum(0), atol=1e-12)
    with pytest.raises(ValueError, match=r"expected a block shaped \(1, 24, b\)"):
        joint.matvec(torch.randn(3, d, 2, dtype=torch.float64))


def test_the_report_is_json_and_states_its_choices():
    model, x, y = tiny_case(B=2)
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=1e-4), method="exact")
    out = json.loads(json.dumps(risk.to_dict()))
    assert out["settings"]["batch_size"] == 2 and "mean gradient" in out["settings"]["reference"]
    assert out["settings"]["isotropic"] == 1e-4
    assert risk.batch_size == 2 and len(out["psnr_gap"]) == 2
    # predicted PSNR is 10·log10(R²/InvLoss)
    assert torch.allclose(risk.predicted_psnr_batch_aware, -10 * torch.log10(risk.invloss_batch_aware.double()))


def test_repricing_under_other_noise_needs_no_new_estimate():
    model, x, y = tiny_case(B=3, seed=2)
    first = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(isotropic=0.0), method="exact")
    noisy = NoiseModel(isotropic=5e-4, rho=2e-3)
    again = first.with_noise(noisy)
    fresh = batch_invloss(model, F.cross_entropy, x, y, noise=noisy, method="exact")
    assert again.joint_spectrum is first.joint_spectrum and again.noise is noisy
    for name in ("invloss_batch_aware", "invloss_conservative", "invloss_conservative_own_reference"):
        assert torch.allclose(getattr(again, name), getattr(fresh, name), rtol=1e-10)
    assert bool((again.invloss_batch_aware > first.invloss_batch_aware).all())  # more noise, less leaked
    with pytest.raises(ValueError, match="noise.shaped is set"):
        first.with_noise(NoiseModel(shaped=torch.ones(3, 2)))


def test_a_linear_release_of_identical_maps_hides_what_the_mean_hides():
    """F(x_b) = W x_b for every b: the mean release reveals only W·mean(x). With W square and no noise the
    attacker knows the mean exactly, so each sample's error is its prior variance times (1 − 1/B)."""
    d, B = 5, 4
    W = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(d)
    op = JacobianOperator(lambda x: W @ x, torch.rand(B, d, dtype=torch.float64), name="linear")
    risk = batch_invloss_from_operator(op, noise=NoiseModel(isotropic=1e-14, rho=0.0), v0=0.1, method="exact")
    assert torch.allclose(risk.invloss_batch_aware, torch.full((B,), 0.1 * (1 - 1 / B), dtype=torch.float64),
                          rtol=1e-6)
    assert bool((risk.invloss_conservative < 1e-9).all())


def test_bad_inputs_are_refused_clearly():
    model, x, y = tiny_case(B=2)
    noise = NoiseModel(isotropic=1e-4)
    run = lambda **kw: batch_invloss(model, F.cross_entropy, x, y, **{"noise": noise, **kw})
    with pytest.raises(TypeError, match="noise must be an invdefend.risk.NoiseModel"):
        run(noise=1e-4)
    with pytest.raises(TypeError, match="prior must be an invdefend.prior.GaussianPrior"):
        run(prior=torch.eye(8))
    with pytest.raises(ValueError, match="noise.shaped is set.*isotropic noise on the mean gradient only"):
        run(noise=NoiseModel(shaped=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="one noise level: pass a scalar"):
        run(noise=NoiseModel(isotropic=torch.tensor([1e-4, 2e-4])))
    with pytest.raises(ValueError, match="either prior= .* or v0="):
        run(prior=GaussianPrior.iid((8,), 0.1, dtype=torch.float64), v0=0.1)
    with pytest.raises(ValueError, match="fit the prior on inputs of the same shape"):
        run(prior=GaussianPrior.iid((3, 4), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="v0=-1.0 must be a finite number > 0"):
        run(v0=-1.0)
    with pytest.raises(ValueError, match="k=0 must be an int >= 1"):
        run(k=0)
    with pytest.raises(ValueError, match="method='svd'"):
        run(method="svd")
    with pytest.raises(ValueError, match="tail='auto'; choose 'slq'"):
        run(tail="auto")
    with pytest.raises(ValueError, match="dynamic_range=0"):
        run(dynamic_range=0)
    with pytest.raises(ValueError, match="slq_probes=0"):
        run(slq_probes=0)
    with pytest.raises(ValueError, match="3 inputs but 2 targets; pass one target per input"):
        batch_invloss(model, F.cross_entropy, torch.rand(3, 8, dtype=torch.float64), y, noise=noise)
    with pytest.raises(ValueError, match="non-empty batch"):
        batch_invloss(model, F.cross_entropy, torch.rand(8, dtype=torch.float64), y, noise=noise)
