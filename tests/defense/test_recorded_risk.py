"""GradientDefense's recorded predicted PSNR against InvLoss computed by hand from the exact spectrum.

The per-sample effective noise of a release is ``B²`` times the noise on the mean gradient (an attacker who
knows the rest of a batch of ``B`` sees ``ḡ = g_i/B + known``, so the mean gradient's noise counts ``B²``
times for one sample). These tests run real steps at ``B = 1`` and ``B = 4`` and recompute the recorded
numbers from ``torch.linalg.svd`` of the dense per-sample Jacobian, the per-sample gradient norms and the
documented formulas (docs/theory.md, InvLoss):

    InvLoss = (1/d)·[Σ_{i ≤ min(d, m)} 1/(s_i²/τ_i + 1/v0) + (d − min(d, m))·v0],
    predicted PSNR = 10·log10(R²/InvLoss),

with ``τ_i`` the effective variance along ``u_i`` plus the reference precision ``(ρ‖g_i‖)²/m``.
Only public API is used: the constructor, ``capture``, ``protect()``, the record and ``defense.spectrum``.
"""

from __future__ import annotations

import math

import pytest
import torch

from invdefend.defense import GradientDefense
from invdefend.jacobian import gradient_jacobian
from tiny_problems import flat_grad, make_problem

V0 = 1.0 / 12  # the default prior variance: uniform on [0, 1] (dynamic range R = 1)
RHO = 0.05  # large enough that the reference precision matters in the comparison


def _per_sample(model, crit, x, y) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Singular values ``(B, min(d, m))`` of each sample's dense gradient Jacobian, each sample's gradient norm
    ``‖g_i‖`` ``(B,)``, and ``d``, ``m``."""
    J = gradient_jacobian(model, crit, x, y).dense()  # (B, m, d)
    s = torch.linalg.svd(J, full_matrices=False).S
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        crit(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(flat_grad(model).norm())
    model.zero_grad(set_to_none=True)
    return s, torch.stack(norms), J.shape[2], J.shape[1]


def _invloss(s: torch.Tensor, tau: torch.Tensor, d: int) -> float:
    """InvLoss of one sample from its complete singular values and the variance along each ``u_i``."""
    head = float((1.0 / (s**2 / tau + 1.0 / V0)).sum())
    return (head + (d - s.numel()) * V0) / d


def _psnr(invloss: float) -> float:
    return 10.0 * math.log10(1.0 / invloss)


def _water_fill(s: torch.Tensor, energy: float, base: float) -> torch.Tensor:
    """The variances ``t_i >= 0``, ``Σ t_i = energy``, maximising ``Σ 1/(s_i²/(base + t_i) + 1/v0)``.

    Each term is concave in ``t_i`` with derivative ``v0² s_i² / (base + t_i + v0 s_i²)²``; equal marginal
    gains ``λ`` on the directions that get noise give ``t_i = (v0 s_i (c − s_i) − base)_+`` with
    ``c = 1/√λ``, and ``c`` is found by bisection on the energy constraint.
    """
    s = s.double()

    def alloc(c: float) -> torch.Tensor:
        return (V0 * s * (c - s) - base).clamp_min(0.0)

    lo, hi = 0.0, 1.0
    while float(alloc(hi).sum()) < energy:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(alloc(mid).sum()) < energy else (lo, mid)
    t = alloc(hi)
    return t * (energy / float(t.sum()))


def _step(batch: int, mechanism: str, budget: float, seed: int):
    model, crit, x, y = make_problem(seed=seed, batch=batch)
    s, norms, d, m = _per_sample(model, crit, x, y)
    assert min(d, m) == d == s.shape[1]
    defense = GradientDefense(model, crit, budget=budget, mechanism=mechanism, k=64, probes=2,
                              refresh_every=10**6, rho=RHO, seed=seed, floor=0.0, prior=None)  # the placement alone
    model.zero_grad(set_to_none=True)
    loss = crit(model(x), y)
    defense.capture(x, y)
    loss.backward()
    g = flat_grad(model)
    record = defense.protect()
    spec = defense.spectrum
    assert record.refreshed and not record.fallback
    # Which samples were probed: match each probe's ‖F(x)‖ with a sample's gradient norm.
    probes = []
    for j in range(spec.batch_size):
        gaps = (norms - float(spec.signal_norm[j])).abs()
        i = int(gaps.argmin())
        assert float(gaps[i]) <= 1e-10 * float(norms[i])
        # k >= min(d, m): the defense holds the exact complete spectrum of that sample
        torch.testing.assert_close(spec.singular_values[j].double(), s[i], rtol=1e-8, atol=1e-12)
        probes.append(i)
    return record, s, norms, probes, float(g @ g), d, m


@pytest.mark.parametrize("batch", [1, 4])
def test_isotropic_recorded_risk_counts_the_mean_gradients_noise_batch_squared_times(batch: int) -> None:
    budget = 0.05
    record, s, norms, probes, G, d, m = _step(batch, "isotropic", budget, seed=3)
    assert len(record.predicted_psnr) == len(probes) == min(2, batch)
    for j, i in enumerate(probes):
        ref = (RHO * float(norms[i])) ** 2 / m
        tau = batch**2 * budget * G / m + ref  # per coordinate: B²·budget·‖ḡ‖²/m, plus the reference
        expected = _psnr(_invloss(s[i], torch.full_like(s[i], tau), d))
        undefended = _psnr(_invloss(s[i], torch.full_like(s[i], ref), d))
        assert record.predicted_psnr[j] == pytest.approx(expected, abs=1e-7)
        assert record.undefended_predicted_psnr[j] == pytest.approx(undefended, abs=1e-7)
        # the noise matters here: the comparison would see a wrong power of B
        wrong = _psnr(_invloss(s[i], torch.full_like(s[i], batch * budget * G / m + ref), d))
        assert batch == 1 or abs(expected - wrong) > 0.5
        assert undefended - expected > 1.0


@pytest.mark.parametrize("batch", [1, 4])
def test_water_filling_recorded_risk_counts_the_mean_gradients_noise_batch_squared_times(batch: int) -> None:
    budget = 0.05
    record, s, norms, probes, G, d, m = _step(batch, "spectral", budget, seed=5)
    P = len(probes)
    assert len(record.predicted_psnr) == P == min(2, batch)
    for j, i in enumerate(probes):
        ref = (RHO * float(norms[i])) ** 2 / m
        # Each probe's subspace gets energy budget·‖ḡ‖²/P on the mean gradient, B² times that per sample,
        # water-filled over the probe's own spectrum on top of the reference precision.
        t = _water_fill(s[i], batch**2 * budget * G / P, ref)
        expected = _psnr(_invloss(s[i], t + ref, d))
        undefended = _psnr(_invloss(s[i], torch.full_like(s[i], ref), d))
        assert record.predicted_psnr[j] == pytest.approx(expected, abs=1e-6)
        assert record.undefended_predicted_psnr[j] == pytest.approx(undefended, abs=1e-7)
        wrong = _psnr(_invloss(s[i], _water_fill(s[i], batch * budget * G / P, ref) + ref, d))
        assert batch == 1 or abs(expected - wrong) > 0.5
        assert undefended - expected > 1.0


def test_recorded_risk_uses_the_given_prior_variance_and_dynamic_range() -> None:
    """With v0 given, InvLoss does not depend on R: the records at R = 2 and R = 1 differ by exactly
    10·log10(4) dB in both PSNRs, and leakage is 1 − InvLoss/v0 with that v0."""
    import math

    from tiny_problems import make_problem

    from invdefend import GradientDefense

    records = {}
    for R in (1.0, 2.0):
        model, crit, x, y = make_problem(seed=1, batch=3)
        d = GradientDefense(model, crit, mechanism="isotropic", budget=0.1, k=500, probes=1, seed=0, v0=0.05,
                            dynamic_range=R, capture=False)
        d.capture(x, y)
        crit(model(x), y).backward()
        records[R] = d.protect()
    one, two = records[1.0], records[2.0]
    shift = 10 * math.log10(4.0)
    assert two.predicted_psnr[0] == pytest.approx(one.predicted_psnr[0] + shift, rel=1e-12)
    assert two.undefended_predicted_psnr[0] == pytest.approx(one.undefended_predicted_psnr[0] + shift, rel=1e-12)
    il = 1.0 / 10 ** (one.predicted_psnr[0] / 10)
    assert one.leakage[0] == pytest.approx(1 - il / 0.05, rel=1e-9) == pytest.approx(two.leakage[0], rel=1e-12)
    assert one.sweeps == 0 and one.estimator_start == "exact"
