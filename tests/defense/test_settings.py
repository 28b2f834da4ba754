"""One settings object for both defenses: each one's defaults, keyword overrides, validation, read-back."""

from __future__ import annotations

import pytest
from torch import nn

from invdefend import DefenseSettings, EmbeddingDefense, GradientDefense
from invdefend.defense.settings import EMBEDDING_DEFAULTS
from invdefend.models import MLP
from invdefend.placements import Chain, Isotropic, Target, WaterFilling


def _model() -> nn.Module:
    return MLP(6, hidden=(4,), out_features=3, activation="tanh").double()


def test_each_defense_starts_from_its_own_defaults() -> None:
    g = GradientDefense(_model(), nn.CrossEntropyLoss(), capture=False)
    e = EmbeddingDefense(_model())
    assert (g.budget, g.k, g.max_budget, g.exact_max_dim, g.fallback_budget) == (0.05, 8, 1.0, 0, 0.5)
    assert (e.budget, e.k, e.max_budget, e.exact_max_dim) == (0.1, 32, 10.0, 256)
    assert e.fallback_budget == pytest.approx(1.0)  # max(10·0.1, 0.5)
    assert all(getattr(e.settings, k) == v for k, v in EMBEDDING_DEFAULTS.items())
    assert g.v0 == pytest.approx(1 / 12) and e.v0 == pytest.approx(1 / 12)


def test_a_settings_object_and_keywords_compose() -> None:
    base = DefenseSettings.for_kind("gradient", budget=0.2, k=4)
    d = GradientDefense(_model(), nn.CrossEntropyLoss(), base, floor=0.05, capture=False)
    assert (d.budget, d.k, d.floor) == (0.2, 4, 0.05)
    assert base.floor is None  # the object itself is unchanged (frozen)
    assert isinstance(d.placement, Chain)
    assert isinstance(d.placement.parts[0], Isotropic) and d.placement.parts[0].budget == 0.05
    assert isinstance(d.placement.parts[1], WaterFilling) and d.placement.parts[1].budget == 0.2
    t = GradientDefense(_model(), nn.CrossEntropyLoss(), target_psnr=25.0, capture=False)
    assert isinstance(t.placement, Chain) and t.placement.parts[0] == Isotropic(budget=0.025)  # the default floor
    assert isinstance(t.placement.parts[1], Target) and t.placement.parts[1].target_invloss == pytest.approx(10 ** -2.5)


def test_unknown_or_bad_settings_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unknown setting.*bugdet"):
        GradientDefense(_model(), nn.CrossEntropyLoss(), bugdet=0.1)
    with pytest.raises(TypeError, match="settings must be a DefenseSettings"):
        GradientDefense(_model(), nn.CrossEntropyLoss(), {"budget": 0.1})
    with pytest.raises(ValueError, match="'band_pass' is not available for EmbeddingDefense"):
        EmbeddingDefense(_model(), mechanism="band_pass")
    with pytest.raises(ValueError, match="exact_max_dim=-1 must be an integer >= 0"):
        EmbeddingDefense(_model(), exact_max_dim=-1)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        GradientDefense(_model(), nn.CrossEntropyLoss(), capture=False).nonsense


def test_embedding_max_sweeps_sets_both_sweep_limits() -> None:
    e = EmbeddingDefense(_model(), max_sweeps=3)
    assert (e.sweeps, e.cold_sweeps) == (3, 3)
    assert (e.estimator.sweeps, e.estimator.cold_sweeps, e.estimator.warm_start) == (3, 3, False)


def test_the_default_gradient_placement_is_half_shaped_half_floor_under_an_online_prior() -> None:
    import torch

    g = GradientDefense(_model(), nn.CrossEntropyLoss(), capture=False)
    assert g.prior == "online" and g.floor is None and g.mechanism == "spectral"
    assert g.settings.energy_split("gradient") == pytest.approx((0.025, 0.025))  # budget 0.05 stays the total
    assert isinstance(g.placement, Chain) and g.placement.parts[0] == Isotropic(budget=0.025)
    assert g.placement.parts[1].budget == pytest.approx(0.025)
    # an explicit floor, another mechanism and the embedding defense keep their budget whole
    assert DefenseSettings.for_kind("gradient", floor=0.01).energy_split("gradient") == (0.05, 0.01)
    assert DefenseSettings.for_kind("gradient", mechanism="isotropic").energy_split("gradient") == (0.05, 0.0)
    # the shaped half is capped at 1·‖ḡ‖²: a large budget goes mostly into the floor, still summing to the budget
    assert DefenseSettings.for_kind("gradient", budget=2.0).energy_split("gradient") == pytest.approx((1.0, 1.0))
    assert DefenseSettings.for_kind("gradient", budget=20.0).energy_split("gradient") == pytest.approx((1.0, 19.0))
    big = GradientDefense(_model(), nn.CrossEntropyLoss(), budget=20.0, capture=False)
    assert big.placement.parts[0] == Isotropic(budget=19.0) and big.placement.parts[1].budget == pytest.approx(1.0)
    assert DefenseSettings.for_kind("gradient", budget=20.0, floor=0.0).energy_split("gradient") == (20.0, 0.0)
    e = EmbeddingDefense(_model())  # the embedding default: isotropic noise priced under the online prior
    assert e.mechanism == "isotropic" and e.prior == "online" and isinstance(e.placement, Isotropic)
    assert e.settings.energy_split("embedding") == (0.1, 0.0)
    assert DefenseSettings.for_kind("embedding", mechanism="spectral").energy_split("embedding") == (0.1, 0.0)
    # a defended step at the defaults releases the budget's energy in total, half of it isotropic
    torch.manual_seed(0)
    model = _model()
    d = GradientDefense(model, nn.CrossEntropyLoss(), seed=0)
    x, y = torch.rand(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    d.capture(x, y)
    nn.CrossEntropyLoss()(model(x), y).backward()
    rec = d.protect()
    assert rec.budget == pytest.approx(0.05, rel=1e-9) and 0.0 < rec.relative_energy < 0.15
    law = d.noise_law()
    m = sum(p.numel() for p in model.parameters())
    g2 = law.sigma2_iso * m / 0.025  # the floor: σ²·m = 0.025·‖ḡ‖²
    assert float(law.tau.sum()) == pytest.approx(0.025 * float(g2), rel=1e-6)
    with pytest.raises(ValueError, match="floor"):
        GradientDefense(_model(), nn.CrossEntropyLoss(), floor=-1.0, capture=False)
