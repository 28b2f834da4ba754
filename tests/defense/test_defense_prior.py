"""Defenses priced under a data prior: a fitted one, or one tracked online from released batches only."""

from __future__ import annotations

import pytest
import torch
from tiny_problems import flat_grad, make_problem, set_grad

from invdefend import EmbeddingDefense, GradientDefense, NoiseCovariance
from invdefend.models import MLP
from invdefend.prior import GaussianPrior, OnlinePrior
from invdefend.risk import NoiseModel, invloss, predicted_psnr


def smooth_samples(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated float64 inputs in [0, 1]: a few smooth components."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, d, dtype=torch.float64)
    basis = torch.stack([torch.cos(3.14159 * f * t) for f in range(4)], dim=1)
    return (0.5 + 0.12 * torch.randn(n, 4, generator=gen, dtype=torch.float64) @ basis.T).clamp(0, 1)


def released(defense: GradientDefense, model, crit, x, y) -> torch.Tensor:
    model.zero_grad()
    crit(model(x), y).backward()
    g = flat_grad(model)
    defense.protect()
    return flat_grad(model) - g


def test_gradient_defense_prices_and_plans_under_a_fitted_prior() -> None:
    model, crit, _, y = make_problem(seed=3, batch=4)
    x = smooth_samples(4, 12, seed=1)
    prior = GaussianPrior.fit(smooth_samples(300, 12, seed=2), rank=6)
    defended = GradientDefense(model, crit, k=4, probes=2, budget=0.2, seed=0, prior=prior)
    plain = GradientDefense(model, crit, k=4, probes=2, budget=0.2, seed=0, prior=None)
    released(defended, model, crit, x, y)
    released(plain, model, crit, x, y)
    rec, rec_iid = defended.last_record, plain.last_record
    assert rec.risk_prior == "data" and rec_iid.risk_prior == "iid"
    spec = defended.spectrum
    assert spec.whitened and spec.prior_trace == pytest.approx(prior.trace)
    # the record's undefended prediction is InvLoss of the whitened spectrum (pixels, under the prior)
    clean = predicted_psnr(invloss(spec, NoiseModel(rho=defended.rho), tail="topk"))
    assert rec.undefended_predicted_psnr == pytest.approx(clean.tolist(), rel=1e-9)
    # an attacker who knows the image prior is priced as more dangerous than the i.i.d. one
    assert min(rec.undefended_predicted_psnr) > max(rec_iid.undefended_predicted_psnr)
    assert all(0.0 <= v <= 1.0 for v in rec.leakage)


def test_the_noise_law_is_the_released_noise_under_a_prior() -> None:
    model, crit, _, y = make_problem(seed=3, batch=4)
    x = smooth_samples(4, 12, seed=1)
    prior = GaussianPrior.fit(smooth_samples(300, 12, seed=2), rank=6)
    defense = GradientDefense(model, crit, k=4, probes=2, budget=0.2, floor=0.02, refresh_every=10**6, seed=0,
                              prior=prior)
    model.zero_grad()
    crit(model(x), y).backward()
    g = flat_grad(model)
    defense.capture(x, y)
    deltas = []
    for _ in range(2000):
        set_grad(model, g)
        defense.protect()
        deltas.append(flat_grad(model) - g)
    deltas = torch.stack(deltas)
    law = defense.noise_law()
    assert isinstance(law, NoiseCovariance)
    dense = law.dense(deltas.shape[1])
    empirical = deltas.T @ deltas / len(deltas)
    assert float(empirical.trace()) == pytest.approx(float(dense.trace()), rel=0.05)
    assert torch.allclose(empirical, dense, atol=0.15 * float(dense.diagonal().max()))


def test_online_prior_learns_only_from_batches_already_released() -> None:
    model, crit, _, _ = make_problem(seed=0, batch=8)
    online = OnlinePrior(rank=4, capacity=64, min_samples=16, refit_every=8)
    defense = GradientDefense(model, crit, k=4, probes=2, budget=0.1, refresh_every=1, seed=0, prior=online)
    labels = []
    for step in range(4):
        x = smooth_samples(8, 12, seed=10 + step)
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(step))
        seen_before = online.seen
        released(defense, model, crit, x, y)
        assert online.seen == seen_before + 8  # observed after it was priced
        labels.append(defense.last_record.risk_prior)
    assert labels[:2] == ["online (iid until 16 samples)"] * 2
    assert labels[2:] == ["online", "online"] and defense.spectrum.whitened


def test_embedding_defense_under_a_prior() -> None:
    torch.manual_seed(0)
    bottom = MLP(12, hidden=(16,), out_features=6, activation="tanh").double()
    prior = GaussianPrior.fit(smooth_samples(300, 12, seed=2), rank=6)
    defense = EmbeddingDefense(bottom, k=6, budget=0.3, seed=0, prior=prior)
    x = smooth_samples(3, 12, seed=5)
    out = defense.protect(x, bottom(x))
    assert out.shape == (3, 6)
    rec = defense.last_record
    assert rec.risk_prior == "data" and len(rec.predicted_psnr) == 3
    assert all(p <= u for p, u in zip(rec.predicted_psnr, rec.undefended_predicted_psnr))


def test_a_bad_prior_is_refused() -> None:
    model, crit, _, _ = make_problem()
    with pytest.raises(ValueError, match="prior="):
        GradientDefense(model, crit, prior="gaussian")
    with pytest.raises(ValueError, match="prior="):
        EmbeddingDefense(MLP(4, hidden=(4,), out_features=2), prior=0.5)


def test_cumulative_risk_is_recorded_from_sample_ids_and_logged() -> None:
    from invdefend.monitor import record_scalars

    model, crit, x, y = make_problem(seed=0, batch=4)
    defense = GradientDefense(model, crit, k=4, probes=2, budget=0.1, refresh_every=1, seed=0)
    ids = torch.tensor([0, 1, 2, 3])
    for step in range(3):
        defense.capture(x, y, ids=ids if step < 2 else torch.tensor([0, 5, 6, 7]))
        model.zero_grad()
        crit(model(x), y).backward()
        defense.protect()
        rec = defense.last_record
        assert rec.releases == (step + 1 if step < 2 else 3)
        # more releases: the cumulative prediction is at least the per-release one, at most 10·log10(T) above
        for one, cum in zip(rec.predicted_psnr, rec.cumulative_predicted_psnr):
            assert one - 1e-9 <= cum <= one + 10 * torch.log10(torch.tensor(float(rec.releases))) + 1e-9
    scalars = record_scalars(rec, lambda kind, name: f"{kind}/{name}")
    assert scalars["gradient/releases/max_count"] == 3.0 and "gradient/risk/cumulative_predicted_psnr_max" in scalars
    # the counts survive a checkpoint
    again = GradientDefense(model, crit, k=4, probes=2, budget=0.1, refresh_every=1, seed=0)
    again.load_state_dict(defense.state_dict())
    assert int(again.ledger.max_count) == 3
    # without ids or a count nothing is claimed; bad ids refuse the step
    plain = GradientDefense(model, crit, k=4, probes=2, budget=0.1, seed=0)
    released(plain, model, crit, x, y)
    assert plain.last_record.releases == 0 and plain.last_record.cumulative_predicted_psnr == []
    plain.capture(x, y, ids=torch.tensor([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="integer sample ids"):
        model.zero_grad()
        crit(model(x), y).backward()
        plain.protect()


def test_releases_per_sample_counts_without_ids() -> None:
    model, crit, x, y = make_problem(seed=0, batch=4)
    defense = GradientDefense(model, crit, k=4, probes=2, budget=0.1, seed=0, releases_per_sample=10)
    released(defense, model, crit, x, y)
    rec = defense.last_record
    assert rec.releases == 10 and len(rec.cumulative_predicted_psnr) == len(rec.predicted_psnr)
    with pytest.raises(ValueError, match="releases_per_sample"):
        GradientDefense(model, crit, releases_per_sample=0)


def test_target_mode_reaches_the_target_on_the_cumulative_risk() -> None:
    """Target mode counts the releases: with 4 releases per sample the release needs four times the isotropic
    noise, and the recorded cumulative PSNR (not the per-release one) sits at the target."""
    model, crit, x, y = make_problem(seed=8, batch=4)
    recs = {}
    for count in (None, 4):
        defense = GradientDefense(model, crit, mechanism="isotropic", target_psnr=30.0, max_budget=100.0, k=64,
                                  seed=8, releases_per_sample=count)
        released(defense, model, crit, x, y)
        recs[count] = defense.last_record
    once, four = recs[None], recs[4]
    assert once.target_reached and four.target_reached and four.releases == 4
    assert four.budget == pytest.approx(4 * once.budget, rel=1e-5)
    assert max(four.cumulative_predicted_psnr) == pytest.approx(30.0, abs=0.05)
    assert max(four.predicted_psnr) < 30.0 - 3.0  # each release alone is far below the target
