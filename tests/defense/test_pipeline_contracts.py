"""Pipeline details the mutation run found unpinned: generators, checkpoint fields, old checkpoints, the
embedding release's exact noise and law, the embedding record's risk model, settings that reach placements."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from inject import after_estimate
from tiny_problems import make_problem

from invdefend import EmbeddingDefense, GradientDefense, NoiseCovariance
from invdefend.models import MLP
from invdefend.noise import SeededNoise


def _bottom() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(6, hidden=(), out_features=5, activation="tanh", final_activation=True).double()


def _x(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_probe_and_estimator_generators_follow_the_seed() -> None:
    model, crit, _, _ = make_problem()
    d = GradientDefense(model, crit, seed=5, capture=False)
    assert d.probe_generator.initial_seed() == 6 and d.estimator.generator is d.probe_generator
    e = EmbeddingDefense(_bottom(), seed=5)
    assert e.estimator_generator.initial_seed() == 6 and e.estimator.generator is e.estimator_generator


def test_checkpoint_keeps_the_failure_count_and_an_old_checkpoint_replans() -> None:
    model, crit, x, y = make_problem(seed=2)
    d = GradientDefense(model, crit, k=4, refresh_every=8, seed=0)

    def fail() -> None:
        raise RuntimeError("injected")

    after_estimate(d, fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(2):
            crit(model(x), y).backward()
            d.protect()
    state = d.state_dict()
    assert state["failures"] == 2 and state["last_failure"].startswith("RuntimeError")
    fresh = GradientDefense(model, crit, k=4, refresh_every=8, seed=0)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["failures"] == 2 and fresh.state_dict()["next_refresh"] == state["next_refresh"]
    # a checkpoint written before plans carried operator_budget: resumes and re-plans at the next step
    ok = GradientDefense(model, crit, k=4, refresh_every=8, seed=0)
    crit(model(x), y).backward()
    ok.protect()
    old = ok.state_dict()
    old["plan"] = {k: v for k, v in old["plan"].items() if k not in ("operator_budget", "risk_noise_model")}
    resumed = GradientDefense(model, crit, k=4, refresh_every=8, seed=0)
    resumed.load_state_dict(old)
    assert resumed.plan is None and resumed.state_dict()["next_refresh"] == resumed.step
    crit(model(x), y).backward()
    record = resumed.protect()
    assert record.refreshed and not record.fallback and resumed.plan is not None


def test_isotropic_embedding_noise_is_exactly_the_seeded_draw_and_its_law_says_so() -> None:
    bottom, x = _bottom(), _x()
    d = EmbeddingDefense(bottom, mechanism="isotropic", budget=0.2, seed=3)
    h = bottom(x).detach()
    noisy = d.protect(x, h)
    energy = h.pow(2).sum(dim=1)
    std = (0.2 * energy / h.shape[1]).sqrt()
    expected = std.unsqueeze(1) * SeededNoise(seed=3).normal(tuple(h.shape), h.dtype, h.device)
    assert torch.allclose(noisy - h, expected, rtol=1e-12, atol=0)
    laws = d.noise_law()
    assert all(isinstance(law, NoiseCovariance) and law.basis is None for law in laws)
    assert [law.sigma2_iso for law in laws] == pytest.approx((0.2 * energy / h.shape[1]).tolist(), rel=1e-12)


def test_embedding_record_uses_the_given_prior_variance_and_dynamic_range() -> None:
    bottom, x = _bottom(), _x(2)
    h = bottom(x).detach()
    records = {}
    for R in (1.0, 2.0):
        d = EmbeddingDefense(bottom, budget=0.1, v0=0.05, dynamic_range=R, seed=0)
        d.protect(x, h)
        records[R] = d.last_record
    shift = 10 * math.log10(4.0)
    one, two = records[1.0], records[2.0]
    assert two.predicted_psnr == pytest.approx([v + shift for v in one.predicted_psnr], rel=1e-12)
    assert two.undefended_predicted_psnr == pytest.approx([v + shift for v in one.undefended_predicted_psnr],
                                                          rel=1e-12)
    il = [10 ** (-v / 10) for v in one.predicted_psnr]
    assert one.leakage == pytest.approx([1 - v / 0.05 for v in il], rel=1e-9)


def test_settings_reach_the_placement_and_are_checked_with_the_prior_in_force() -> None:
    model, crit, _, _ = make_problem()
    d = GradientDefense(model, crit, mechanism="band_pass", band_pass_steps=1, band_pass_quantile=0.4, capture=False)
    assert d.placement.describe() == {"placement": "band_pass", "budget": 0.05, "steps": 1, "quantile": 0.4}
    # with v0 = 0.05 a release that reveals nothing has predicted PSNR 13.0 dB: 12 dB is out of reach
    with pytest.raises(ValueError, match="target_psnr=12"):
        GradientDefense(model, crit, v0=0.05, target_psnr=12.0, capture=False)
    assert GradientDefense(model, crit, target_psnr=12.0, capture=False).target_psnr == 12.0
