"""Placements alone (no defense): the registry, each placement's plan on a hand-made context, composition."""

from __future__ import annotations

import pytest
import torch

from invdefend.allocation import water_filling
from invdefend.placements import (
    BandPass, Chain, Isotropic, Monitor, NoisePlan, PlanContext, Target, WaterFilling, available, compose,
    get_placement,
)
from invdefend.risk import NoiseModel, invloss, reference_noise
from invdefend.spectral import Spectrum

V0 = 1 / 12


def _ctx(scale: float = 4.0, energy: float = 2.0, shares: int = 2) -> PlanContext:
    s = torch.tensor([[3.0, 1.0, 0.2], [2.0, 0.5, 0.1]], dtype=torch.float64)
    spec = Spectrum(singular_values=s, right_vectors=None, left_vectors=None, in_dim=3, out_dim=50,
                    signal_norm=torch.tensor([1.5, 0.7], dtype=torch.float64), method="exact", complete=True)
    return PlanContext(spec, scale, energy, shares, V0, 0.01)


def test_registry_names_and_errors() -> None:
    assert available()[:4] == ("spectral", "band_pass", "isotropic", "monitor")
    assert "band_pass" not in available("embedding")
    assert get_placement("spectral") is WaterFilling
    with pytest.raises(ValueError, match=r"mechanism='nope'; choose 'spectral', 'band_pass', 'isotropic' or 'monitor'"):
        get_placement("nope", "gradient", "GradientDefense")


def test_isotropic_and_water_filling_plans_by_hand() -> None:
    ctx = _ctx()
    iso = Isotropic(budget=0.3).plan(ctx)
    assert iso.shaped is None and torch.allclose(iso.isotropic, torch.full((2,), 4.0 * 0.3 * 2.0 / 50, dtype=torch.float64))
    wf = WaterFilling(budget=0.3).plan(ctx)
    base = reference_noise(ctx.spectrum.signal_norm, 50, 0.01)
    expected = water_filling(ctx.singular_values, 4.0 * 0.3 * 2.0 / 2, V0, base, iterations=60)
    assert torch.equal(wf.shaped, expected) and torch.equal(wf.isotropic, torch.zeros(2, dtype=torch.float64))
    assert wf.risk_noise_model == "full"


def test_water_filling_on_a_whitened_spectrum_uses_the_pixel_weights() -> None:
    """With a data prior the spectrum is that of J·A and carries w_i = ‖A v_i‖²; the plan is the weighted
    allocation (THEORY §8.5), which differs from the unweighted one when the weights differ."""
    ctx = _ctx()
    w = torch.tensor([[0.02, 1.0, 0.5], [1.5, 0.01, 0.3]], dtype=torch.float64)
    spec = Spectrum(singular_values=ctx.singular_values, right_vectors=None, left_vectors=None, in_dim=3, out_dim=50,
                    signal_norm=ctx.spectrum.signal_norm, method="exact", complete=True, prior_weights=w)
    wctx = PlanContext(spec, 4.0, 2.0, 2, 1.0, 0.01)
    assert torch.equal(wctx.weights, w) and ctx.weights is None
    plan = WaterFilling(budget=0.3).plan(wctx)
    base = reference_noise(spec.signal_norm, 50, 0.01)
    expected = water_filling(ctx.singular_values, 4.0 * 0.3 * 2.0 / 2, 1.0, base, weights=w, iterations=60)
    assert torch.equal(plan.shaped, expected)
    unweighted = water_filling(ctx.singular_values, 4.0 * 0.3 * 2.0 / 2, 1.0, base, iterations=60)
    assert (plan.shaped - unweighted).abs().max() > 0.05


def test_a_chain_plans_the_floor_first_and_targets_its_last_member() -> None:
    ctx = _ctx()
    chain = Chain((Isotropic(budget=0.1), WaterFilling(budget=0.3)))
    plan = chain.plan(ctx)
    floor = 4.0 * 0.1 * 2.0 / 50
    base = reference_noise(ctx.spectrum.signal_norm, 50, 0.01) + floor
    assert torch.allclose(plan.isotropic, torch.full((2,), floor, dtype=torch.float64))
    assert torch.equal(plan.shaped, water_filling(ctx.singular_values, 4.0 * 0.3 * 2.0 / 2, V0, base, iterations=60))
    moved = chain.with_budget(0.5)
    assert moved.parts[0].budget == 0.1 and moved.parts[1].budget == 0.5
    assert chain.name == "spectral" and chain.kinds == ("gradient", "embedding") and chain.needs_spectrum
    assert Chain((Isotropic(budget=0.1), BandPass(budget=0.2))).kinds == ("gradient",)
    assert not Chain((Isotropic(budget=0.1), BandPass(budget=0.2))).needs_spectrum
    with pytest.raises(ValueError, match="at least one"):
        Chain(())


def test_monitor_passes_the_prior_through_and_band_pass_declares_operator_noise() -> None:
    ctx = _ctx()
    prior = Isotropic(budget=0.2).plan(ctx)
    assert Monitor().plan(ctx, prior) is prior
    assert torch.equal(Monitor().plan(ctx).isotropic, torch.zeros(2, dtype=torch.float64))
    bp = Chain((Isotropic(budget=0.05), BandPass(budget=0.2, steps=8, quantile=0.3))).plan(ctx)
    assert bp.operator_budget == 0.2 and bp.risk_noise_model == "floor_only" and bp.shaped is None
    assert isinstance(bp.operator_placement, BandPass)
    moved = BandPass(budget=0.2, steps=8, quantile=0.3).with_budget(0.7)
    assert moved == BandPass(budget=0.7, steps=8, quantile=0.3)
    assert moved.describe() == {"placement": "band_pass", "budget": 0.7, "steps": 8, "quantile": 0.3}
    assert repr(moved) == "BandPass(budget=0.7, steps=8, quantile=0.3)"


def test_target_finds_the_least_budget_per_probe() -> None:
    ctx = _ctx(scale=1.0, energy=1.0, shares=1)
    target_il = 0.05
    plan = Target(WaterFilling(budget=0.0), target_il, max_budget=50.0).plan(ctx)
    il = invloss(ctx.spectrum, NoiseModel(shaped=plan.shaped, rho=0.01), v0=V0, tail="topk")
    assert plan.target_reached is True
    assert torch.allclose(il.double(), torch.full((2,), target_il, dtype=torch.float64), rtol=1e-6)
    short = Target(WaterFilling(budget=0.0), target_il, max_budget=1e-6).plan(ctx)
    assert short.target_reached is False
    capped = WaterFilling(budget=1e-6).plan(ctx)
    assert torch.allclose(short.shaped, capped.shaped)
    desc = Target(Isotropic(), target_il, 2.0).describe()
    assert desc["inner"] == {"placement": "isotropic", "budget": 0.05} and desc["max_budget"] == 2.0
    with pytest.raises(ValueError, match="does not support target mode"):
        Target(Monitor(), target_il, 1.0)


def test_target_counts_the_cumulative_releases() -> None:
    """With T releases the target is reached on the cumulative risk (release noise / T, THEORY §8.7): the plan
    holds T times the noise of the single-release plan on every direction it uses, and its own cumulative
    InvLoss sits at the target."""
    from dataclasses import replace

    from invdefend.cumulative import cumulative_invloss

    ctx = _ctx(scale=1.0, energy=1.0, shares=1)
    target_il = 0.05
    one = Target(Isotropic(budget=0.0), target_il, max_budget=500.0).plan(ctx)
    four = Target(Isotropic(budget=0.0), target_il, max_budget=500.0).plan(replace(ctx, releases=4))
    assert one.target_reached and four.target_reached
    # τ_ref + σ₄²/4 = τ_ref + σ₁²: four times the release noise (the reference precision does not average)
    assert torch.allclose(four.isotropic / one.isotropic, torch.full((2,), 4.0, dtype=torch.float64), rtol=1e-6)
    il = cumulative_invloss(ctx.spectrum, four.noise_model(0.01), 4, v0=V0, tail="topk")
    assert torch.allclose(il.double(), torch.full((2,), target_il, dtype=torch.float64), rtol=1e-6)


def test_compose_builds_floor_and_target_around_the_named_placement() -> None:
    plain = compose("spectral", kind="gradient", budget=0.2)
    assert plain == WaterFilling(budget=0.2)
    full = compose("isotropic", kind="embedding", budget=0.2, floor=0.05, target_invloss=0.01, max_budget=3.0)
    assert isinstance(full, Chain) and isinstance(full.parts[1], Target)
    assert full.parts[0] == Isotropic(budget=0.05) and full.parts[1].inner == Isotropic(budget=0.2)
    assert compose("monitor", kind="gradient", budget=0.2, floor=0.1) == Monitor()
    assert compose("band_pass", kind="gradient", budget=0.2, options={"steps": 5}) == BandPass(budget=0.2, steps=5)
    assert isinstance(NoisePlan(None, torch.zeros(1)).noise_model(0.1), NoiseModel)
