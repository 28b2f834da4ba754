"""The one estimation path: use_exact, estimate_spectrum's labels, SpectrumTracker's warm start and its
extension, the trust check, Spectrum selection and (de)serialisation, and the shared Lanczos kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from invdefend.jacobian import embedding_jacobian
from invdefend.spectral import (
    Spectrum, SpectrumTracker, check_estimate, estimate_spectrum, estimator_error, exact_spectrum, lanczos, use_exact,
)


def _op(d: int = 10, m: int = 40, batch: int = 2, seed: int = 0, scale: float = 1.0):
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(d, m), nn.Tanh(), nn.Linear(m, m)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(scale)
    x = torch.rand(batch, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return embedding_jacobian(layer, x)


def test_use_exact_is_one_rule() -> None:
    assert use_exact(10, 40, 10) and use_exact(40, 10, 10) and not use_exact(10, 40, 9)
    assert use_exact(10, 40, 2, exact_max_dim=10) and not use_exact(10, 40, 2, exact_max_dim=9)
    assert not use_exact(2, 3, 1)  # exact_max_dim defaults to 0: only k decides


def test_estimate_spectrum_says_how_it_was_obtained() -> None:
    op = _op()
    assert estimate_spectrum(op, 10).extra["start"] == "exact"
    cold = estimate_spectrum(op, 3, generator=torch.Generator().manual_seed(0))
    assert cold.extra["start"] == "cold" and cold.method == "subspace"
    warm = estimate_spectrum(op, 3, init=cold, generator=torch.Generator().manual_seed(0))
    assert warm.extra["start"] == "warm"
    assert estimate_spectrum(op, 3, method="exact").extra["start"] == "exact"
    with pytest.raises(ValueError, match="method='nope'"):
        estimate_spectrum(op, 3, method="nope")
    # the SLQ tail draws its probes from the given generator: the same seed gives the same rule
    a = estimate_spectrum(op, 3, tail=True, generator=torch.Generator().manual_seed(5))
    b = estimate_spectrum(op, 3, tail=True, generator=torch.Generator().manual_seed(5))
    assert a.tail is not None and torch.equal(a.tail.nodes, b.tail.nodes)


def test_tracker_warm_starts_from_the_accepted_estimate_and_extends_when_tracking_is_lost() -> None:
    op = _op()
    tracker = SpectrumTracker(3, oversample=2, sweeps=1, cold_sweeps=8, max_residual=1e-3,
                              generator=torch.Generator().manual_seed(0))
    first = tracker.estimate(op)
    assert first.extra["start"] == "cold"
    tracker.accept(check_estimate(first, 1e-3))
    # a moved spectrum: one warm sweep is not enough at this tolerance, so it extends and converges
    moved = _op(seed=0, scale=1.3)
    second = tracker.estimate(moved)
    assert second.extra["start"] == "warm+extended" and second.sweeps > 1
    assert estimator_error(second) <= 1e-3
    exact = exact_spectrum(moved).singular_values[:, :3]
    assert torch.allclose(second.singular_values, exact, rtol=1e-4)
    assert tracker.previous is first  # only accept() moves the warm start
    cold_only = SpectrumTracker(3, warm_start=False, generator=torch.Generator().manual_seed(0))
    cold_only.accept(first)
    assert cold_only.estimate(op).extra["start"] == "cold"
    assert SpectrumTracker(12).estimate(op).extra["start"] == "exact"


def test_trust_check_and_backward_error() -> None:
    op = _op()
    exact = exact_spectrum(op)
    assert estimator_error(exact) == 0.0
    assert estimator_error(dataclasses.replace(exact, residuals=None)) == 0.0
    assert check_estimate(exact, 1e-9) is exact
    bad = dataclasses.replace(exact, residuals=torch.full_like(exact.singular_values, 2.0))
    assert estimator_error(bad) == pytest.approx(2.0)
    with pytest.raises(RuntimeError, match="did not converge"):
        check_estimate(bad, 0.5)
    with pytest.raises(FloatingPointError, match="NaN"):
        check_estimate(dataclasses.replace(exact, singular_values=exact.singular_values * float("nan")), 0.5)


def test_select_and_state_round_trip_keep_every_field() -> None:
    spec = estimate_spectrum(_op(batch=3), 3, generator=torch.Generator().manual_seed(0))
    one = spec.select([2])
    assert torch.equal(one.singular_values, spec.singular_values[2:3])
    assert torch.equal(one.left_vectors, spec.left_vectors[2:3])
    assert torch.equal(one.right_vectors, spec.right_vectors[2:3])
    assert torch.equal(one.extra["warm_start"], spec.extra["warm_start"][2:3])
    back = Spectrum.from_state(spec.state_dict())
    for name in ("singular_values", "left_vectors", "right_vectors", "signal_norm", "residuals"):
        assert torch.equal(getattr(back, name), getattr(spec, name)), name
    assert (back.method, back.sweeps, back.tol, back.complete, back.in_dim, back.out_dim) == \
        (spec.method, spec.sweeps, spec.tol, spec.complete, spec.in_dim, spec.out_dim)
    assert back.method == "subspace" and back.sweeps > 0


def test_lanczos_stops_at_an_invariant_subspace_only_when_asked() -> None:
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64)).Q
    A = basis @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ basis.T  # rank 3

    def apply(q: torch.Tensor) -> torch.Tensor:
        return A @ q

    start = torch.randn(1, 12, 2, generator=g, dtype=torch.float64)
    Q, T, norm = lanczos(apply, start, 8, stop_on_breakdown=True)
    assert T.shape[-1] <= 4 and Q.shape == (1, 2, 12, T.shape[-1])
    assert torch.allclose(norm, start.norm(dim=1))
    theta = torch.linalg.eigvalsh(T[0, 0])
    assert torch.allclose(theta[theta > 1e-8], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), atol=1e-10)
    _, T_all, _ = lanczos(apply, start, 8)
    assert T_all.shape[-1] == 8
    # Gauss quadrature: startᵀ A start = ‖start‖² Σ_j (e₁ᵀ y_j)² θ_j, for each column
    th, Y = torch.linalg.eigh(T)
    quad = norm.pow(2) * (Y[..., 0, :].pow(2) * th).sum(-1)
    exact = torch.einsum("bdp,de,bep->bp", start, A, start)
    assert torch.allclose(quad, exact, rtol=1e-10)


def test_a_small_models_cold_start_iterates_to_tol_and_a_large_ones_stops_at_the_trust_margin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A small model's cold start iterates every top-k pair to ``tol`` (its noise is placed on that subspace
    for a whole refresh period: stopping at the trust margin cost 4 points of photo accuracy at E = 1,
    docs/theory.md §10.4); a large model's (the memory-lean path, products expensive) stops at backward error
    ``max_residual / 2``, and its warm refreshes too."""
    import invdefend.spectral as spectral
    from invdefend.spectral import topk_spectrum

    op = _op(d=60, m=80, seed=1)
    to_tol = topk_spectrum(op, 4, oversample=1, max_sweeps=30, generator=torch.Generator().manual_seed(0))

    def tracker() -> SpectrumTracker:
        return SpectrumTracker(4, oversample=1, sweeps=30, cold_sweeps=30, max_residual=0.2,
                               generator=torch.Generator().manual_seed(0))

    small = tracker().estimate(op)
    assert small.extra["start"] == "cold" and small.sweeps == to_tol.sweeps
    assert float(small.residuals.max()) <= 1e-2 + 1e-12  # every top-k pair to tol, beyond the trust margin
    monkeypatch.setattr(spectral, "IMAGE_BYTES", 0)  # every operator is now "large"
    large_tracker = tracker()
    large = large_tracker.estimate(op)
    assert large.extra["start"] == "cold"
    assert estimator_error(large) <= 0.1 < estimator_error(to_tol) + 0.1
    assert large.sweeps < to_tol.sweeps, (large.sweeps, to_tol.sweeps)
    large_tracker.accept(large)
    warm = large_tracker.estimate(op)
    assert warm.extra["start"] == "warm" and estimator_error(warm) <= 0.1


def test_a_spectrum_converts_its_tensors_to_a_dtype() -> None:
    spec = estimate_spectrum(_op(), 3, generator=torch.Generator().manual_seed(0))
    single = spec.to(torch.float32)
    assert single.singular_values.dtype == single.right_vectors.dtype == single.left_vectors.dtype == torch.float32
    assert single.signal_norm.dtype == single.residuals.dtype == torch.float32
    assert single.extra["warm_start"].dtype == torch.float32 and single.extra["start"] == spec.extra["start"]
    torch.testing.assert_close(single.singular_values, spec.singular_values.float())
