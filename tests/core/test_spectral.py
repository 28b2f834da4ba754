"""Spectrum estimators against an exact SVD, warm-start tracking, and Lanczos quadrature."""

import copy

import pytest
import torch
import torch.nn.functional as F

from invdefend import estimate_embedding_spectrum, estimate_gradient_spectrum
from invdefend.jacobian import embedding_jacobian, gradient_jacobian
from invdefend.spectral import exact_spectrum, tail_quadrature, topk_spectrum


def _rel_err(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((est - ref).abs() / ref).max())


@pytest.fixture(scope="module")
def lenet_exact(lenet_case):
    model, loss, x, y = lenet_case
    op = gradient_jacobian(model, loss, x, y)
    return op, exact_spectrum(op)


def test_subspace_matches_exact_svd_top16_lenet_gradient(lenet_exact):
    op, exact = lenet_exact
    est = topk_spectrum(op, 16, generator=torch.Generator().manual_seed(1))
    assert est.converged.all()
    assert _rel_err(est.singular_values, exact.singular_values[:, :16]) < 0.01
    # the singular vectors match too (up to sign): |<u_est, u_exact>| close to 1 for the well-separated top
    overlap = (est.left_vectors[0, :, :4] * exact.left_vectors[0, :, :4]).sum(0).abs()
    assert (overlap > 0.99).all()


def test_subspace_matches_exact_svd_top16_mlp_embedding(mlp_bottom):
    bottom, x = mlp_bottom
    op = embedding_jacobian(bottom, x)
    exact = exact_spectrum(op)
    est = topk_spectrum(op, 16, generator=torch.Generator().manual_seed(2))
    assert _rel_err(est.singular_values, exact.singular_values[:, :16]) < 0.01
    via_api = estimate_embedding_spectrum(bottom, x, k=16)
    assert _rel_err(via_api.singular_values, exact.singular_values[:, :16]) < 0.01


def test_warm_start_tracks_after_sgd_steps_within_two_sweeps(lenet_case):
    model, loss, x, y = lenet_case
    model = copy.deepcopy(model)
    before = estimate_gradient_spectrum(model, loss, x, y, k=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    batch = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch), labels).backward()
        opt.step()
    op = gradient_jacobian(model, loss, x, y)
    exact = torch.linalg.svdvals(op.dense())[:, :16]  # the exact SVD's values
    moved = _rel_err(before.singular_values, exact)
    warm = topk_spectrum(op, 16, init=before, max_sweeps=2)
    assert warm.sweeps <= 2
    assert moved > 0.02, "the SGD steps should move the spectrum, or the test proves nothing"
    assert _rel_err(warm.singular_values, exact) < 0.02
    cold = topk_spectrum(op, 16, max_sweeps=2, generator=torch.Generator().manual_seed(4))
    assert _rel_err(warm.singular_values, exact) < _rel_err(cold.singular_values, exact)


def test_small_input_space_gives_exact_spectrum():
    torch.manual_seed(0)
    A = torch.randn(40, 10, dtype=torch.float64)
    bottom = torch.nn.Linear(10, 40, bias=False).double()
    with torch.no_grad():
        bottom.weight.copy_(A)
    op = embedding_jacobian(bottom, torch.randn(1, 10, dtype=torch.float64))
    est = topk_spectrum(op, 16)  # k capped at d = 10; the Krylov space fills R^10
    assert est.k == 10 and est.complete
    torch.testing.assert_close(est.singular_values[0], torch.linalg.svdvals(A), rtol=1e-8, atol=1e-10)


def test_tail_quadrature_matches_exact_spectral_sum(lenet_exact):
    op, exact = lenet_exact
    est = topk_spectrum(op, 16, generator=torch.Generator().manual_seed(5))
    rule = tail_quadrature(op, est, probes=8, steps=40, generator=torch.Generator().manual_seed(6))
    lam = exact.singular_values[0].double() ** 2
    v0 = 1 / 12
    for tau in (1e-2, 1e-1, 1.0):
        f = lambda l: 1.0 / (l / tau + 1.0 / v0)  # noqa: E731
        truth = f(lam[16:]).sum() + (op.in_dim - lam.numel()) * v0
        approx = rule.apply(f(rule.nodes.double()))[0]
        assert abs(float(approx - truth)) / float(truth) < 0.03, (tau, float(approx), float(truth))


def test_warm_start_shape_mismatch_is_refused(lenet_exact):
    op, _ = lenet_exact
    with pytest.raises(ValueError, match="warm start"):
        topk_spectrum(op, 4, init=torch.randn(1, 10, 4))
