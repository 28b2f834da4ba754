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
    assert base.floor == 0.0  # the object itself is unchanged (frozen)
    assert isinstance(d.placement, Chain)
    assert isinstance(d.placement.parts[0], Isotropic) and d.placement.parts[0].budget == 0.05
    assert isinstance(d.placement.parts[1], WaterFilling) and d.placement.parts[1].budget == 0.2
    t = GradientDefense(_model(), nn.CrossEntropyLoss(), target_psnr=25.0, capture=False)
    assert isinstance(t.placement, Target) and t.placement.target_invloss == pytest.approx(10 ** -2.5)


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
