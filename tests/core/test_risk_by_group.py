"""Per-block (per-token) InvLoss against the exact Gaussian posterior covariance, and consistent with the
sequence's InvLoss."""

from __future__ import annotations

import pytest
import torch

from invdefend.jacobian import JacobianOperator
from invdefend.prior import GaussianPrior
from invdefend.risk import NoiseModel, invloss, invloss_by_group, reference_noise
from invdefend.spectral import estimate_spectrum

B, d, m, G = 2, 12, 20, 4


def _operator(seed: int) -> tuple[JacobianOperator, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, d, generator=gen, dtype=torch.float64) * torch.linspace(2.0, 0.05, d, dtype=torch.float64)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    return JacobianOperator(lambda v, Jb: Jb @ v, x, (J,)), J


def _prior(seed: int) -> GaussianPrior:
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, 3, generator=gen, dtype=torch.float64))
    return GaussianPrior(torch.zeros(d, dtype=torch.float64), basis, torch.tensor([3.0, 1.0, 0.4], dtype=torch.float64),
                         0.05 + 0.1 * torch.rand(d, generator=gen, dtype=torch.float64), (G, d // G))


def _exact_blocks(J: torch.Tensor, C: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr of each block of (C⁻¹ + JᵀJ/σ²)⁻¹, per coordinate."""
    out = []
    for b in range(B):
        post = torch.linalg.inv(torch.linalg.inv(C) + J[b].T @ J[b] / sigma2[b])
        out.append(post.diagonal().reshape(G, -1).mean(-1))
    return torch.stack(out)


@pytest.mark.parametrize("with_prior", [False, True])
def test_complete_spectrum_blocks_equal_the_exact_posterior(with_prior: bool):
    op, J = _operator(0)
    iso = torch.tensor([1e-3, 1e-2], dtype=torch.float64)
    noise = NoiseModel(rho=1e-3, isotropic=iso)
    if with_prior:
        prior = _prior(1)
        spec = estimate_spectrum(op, d, method="exact", prior=prior)
        C = prior.covariance()
        got = invloss_by_group(spec, noise, groups=G, prior=prior)
    else:
        prior, v0 = None, 0.4
        spec = estimate_spectrum(op, d, method="exact")
        C = v0 * torch.eye(d, dtype=torch.float64)
        got = invloss_by_group(spec, noise, groups=G, v0=v0)
    sigma2 = reference_noise(spec.signal_norm, m, noise.rho) + iso
    torch.testing.assert_close(got, _exact_blocks(J, C, sigma2), rtol=1e-8, atol=1e-12)
    # blocks differ (the Jacobian's columns are scaled unevenly): the per-token figure is not the mean
    assert float(got.std(-1).min()) > 0.01 * float(got.mean())


@pytest.mark.parametrize("with_prior", [False, True])
def test_topk_blocks_average_to_the_sequence_invloss(with_prior: bool):
    op, _ = _operator(2)
    noise = NoiseModel(rho=0.01, isotropic=torch.tensor([0.01, 0.1], dtype=torch.float64))
    prior = _prior(3) if with_prior else None
    spec = estimate_spectrum(op, 3, method="subspace", prior=prior, max_sweeps=30, tol=1e-8)
    got = invloss_by_group(spec, noise, groups=G, prior=prior, v0=0.2)
    torch.testing.assert_close(got.mean(-1), invloss(spec, noise, v0=0.2, tail="topk").double(), rtol=1e-9, atol=1e-12)
    assert (got > 0).all()


def test_bad_groups_and_missing_prior_are_named():
    op, _ = _operator(4)
    spec = estimate_spectrum(op, d, method="exact", prior=_prior(5))
    with pytest.raises(ValueError, match="groups=5 must divide the input dimension 12"):
        invloss_by_group(spec, groups=5)
    with pytest.raises(ValueError, match="needs the GaussianPrior it was whitened with"):
        invloss_by_group(spec, groups=G)
