"""EmbeddingDefense: per-sample noise energy and basis, a trainable top model, fail-closed fallback, removal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invdefend.data import digits_split
from invdefend.defense import DefenseError, EmbeddingDefense
from invdefend.jacobian import embedding_jacobian
from invdefend.models import MLP, SplitModel
from invdefend.spectral import exact_spectrum
from inject import after_estimate


def bottom_model(seed: int = 0, d: int = 6, m: int = 10) -> nn.Module:
    """A float64 bottom model whose embedding (m = 10) is wider than its input (d = 6): rank(J) <= 6 < m."""
    torch.manual_seed(seed)
    return MLP(d, hidden=(16,), out_features=m, activation="tanh").double()


def inputs(seed: int = 0, batch: int = 5, d: int = 6) -> torch.Tensor:
    return torch.rand(batch, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def noise_draws(defense: EmbeddingDefense, bottom: nn.Module, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean embeddings ``(B, m)`` and ``n`` independent noise draws ``(n, B, m)`` from the attached hook.

    Every sample's noise is drawn independently, so one batch holding each sample ``n`` times gives ``n``
    draws per sample from a single release.
    """
    defense.detach()
    clean = bottom(x).detach()
    defense.attach()
    B = x.shape[0]
    noisy = bottom(x.repeat(n, *([1] * (x.dim() - 1)))).detach()  # rows: draw-major, then sample
    return clean, noisy.view(n, B, -1) - clean


def test_per_sample_noise_has_the_budgets_energy_in_each_samples_own_basis() -> None:
    bottom, x = bottom_model(), inputs()
    budget = 0.3
    defense = EmbeddingDefense(bottom, budget=budget, mechanism="spectral", seed=0).attach()
    clean, noise = noise_draws(defense, bottom, x, 800)
    rec = defense.last_record
    energy = (clean**2).sum(dim=1)  # (B,)
    rel = (noise**2).sum(dim=2) / energy  # (n, B)
    for b in range(x.shape[0]):
        se = float(rel[:, b].std()) / math.sqrt(rel.shape[0])
        assert abs(float(rel[:, b].mean()) - budget) <= 4.5 * se, (b, float(rel[:, b].mean()))
    # Each sample's noise lies in the span of its own left singular vectors (rank 6 inside R^10).
    defense.detach()
    spec = exact_spectrum(embedding_jacobian(bottom, x))
    for b in range(x.shape[0]):
        U = spec.left_vectors[b][:, spec.singular_values[b] > 1e-12]
        assert U.shape[1] == 6
        outside = noise[:, b] - (noise[:, b] @ U) @ U.T
        assert float(outside.abs().max()) <= 1e-9 * float(noise[:, b].abs().max())
    assert rec.budget == pytest.approx(budget, rel=1e-6) and not rec.fallback
    assert rec.relative_energy == pytest.approx(float(rel.mean()), rel=1e-9)
    assert len(rec.predicted_psnr) == noise.shape[0] * x.shape[0]
    assert all(p < u for p, u in zip(rec.predicted_psnr, rec.undefended_predicted_psnr))


def test_isotropic_and_floor_fill_every_coordinate() -> None:
    bottom, x = bottom_model(1), inputs(1)
    defense = EmbeddingDefense(bottom, budget=0.2, mechanism="isotropic", seed=1).attach()
    clean, noise = noise_draws(defense, bottom, x, 600)
    rel = ((noise**2).sum(dim=2) / (clean**2).sum(dim=1)).mean(dim=0)
    assert torch.allclose(rel, torch.full_like(rel, 0.2), rtol=0.15)
    defense.detach()
    spec = exact_spectrum(embedding_jacobian(bottom, x))
    U = spec.left_vectors[0]
    outside = noise[:, 0] - (noise[:, 0] @ U) @ U.T
    # Isotropic noise: 4 of the 10 coordinates' worth of energy lies outside range(J).
    frac = float((outside**2).sum() / (noise[:, 0] ** 2).sum())
    assert frac == pytest.approx(0.4, abs=0.05)


def test_top_model_trains_on_noisy_embeddings_and_gradients_reach_the_bottom() -> None:
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    torch.manual_seed(0)
    bottom = MLP(64, hidden=(32,), out_features=16, activation="relu", final_activation=True)
    top = MLP(16, hidden=(32,), out_features=10)
    model = SplitModel(bottom, top)
    budget = 0.1
    defense = EmbeddingDefense(bottom, budget=budget, seed=0).attach()  # the defaults: isotropic, online prior
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    top_before = [p.detach().clone() for p in top.parameters()]
    for step in range(200):
        idx = torch.randint(0, len(x_train), (32,), generator=gen)
        opt.zero_grad()
        loss = crit(model(x_train[idx]), y_train[idx])
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                       for p in model.parameters())
        opt.step()
    records = defense.monitor.history
    assert len(records) == 200 and not any(r.fallback for r in records)
    # priced under the i.i.d. prior for the first 128 samples (4 batches), then under the prior fitted online
    assert [r.risk_prior for r in records[:5]] == ["online (iid until 128 samples)"] * 4 + ["online"]
    assert all(r.risk_prior == "online" for r in records[4:])
    # The per-sample energy set by the budget, on every batch (32 samples: mean within a few per cent).
    assert all(r.budget == pytest.approx(budget, rel=1e-4) for r in records)
    assert sum(r.relative_energy for r in records) / len(records) == pytest.approx(budget, rel=0.05)
    assert all(not torch.equal(a, b) for a, b in zip(top_before, top.parameters()))
    with torch.no_grad():
        noisy_acc = float((model(x_test).argmax(1) == y_test).float().mean())  # inference sends noisy embeddings too
    assert noisy_acc > 0.6  # chance is 0.1: the top model learned from noisy embeddings


def test_estimation_failure_falls_back_to_conservative_noise() -> None:
    bottom, x = bottom_model(2), inputs(2)
    seen = []
    defense = EmbeddingDefense(bottom, budget=0.1, seed=2, callbacks=[seen.append]).attach()

    def fail() -> None:
        raise RuntimeError("injected failure")

    after_estimate(defense, fail)
    defense.detach()
    clean = bottom(x).detach()
    defense.attach()
    with pytest.warns(RuntimeWarning, match="estimation failed"):
        noisy = bottom(x).detach()
    rec = seen[-1]
    assert rec.fallback and rec.mechanism == "fallback" and "injected failure" in rec.fallback_reason
    assert rec.budget == pytest.approx(defense.fallback_budget) == pytest.approx(1.0)
    rel = ((noisy - clean) ** 2).sum(dim=1) / (clean**2).sum(dim=1)
    assert float(rel.min()) > 0
    assert rec.relative_energy == pytest.approx(float(rel.mean()), rel=1e-9)
    # In monitor mode (no noise by request) a failed estimate is recorded and nothing is added.
    monitor = EmbeddingDefense(bottom, mechanism="monitor", seed=2, callbacks=[seen.append])
    after_estimate(monitor, fail)
    defense.detach()
    monitor.attach()
    assert torch.equal(bottom(x).detach(), clean)
    assert not seen[-1].fallback and "injected failure" in seen[-1].fallback_reason


def test_detach_restores_clean_embeddings_and_eval_switch() -> None:
    bottom, x = bottom_model(3), inputs(3)
    clean = bottom(x).detach()
    defense = EmbeddingDefense(bottom, budget=0.1, active_in_eval=False, seed=3).attach()
    assert defense.attached
    assert not torch.equal(bottom(x).detach(), clean)
    bottom.eval()
    assert torch.equal(bottom(x).detach(), clean)  # inference embeddings pass when active_in_eval=False
    bottom.train()
    defense.detach()
    assert not defense.attached and torch.equal(bottom(x).detach(), clean)
    assert not bottom._forward_hooks


def test_state_dict_round_trip_repeats_the_noise() -> None:
    bottom, x = bottom_model(4), inputs(4)
    a = EmbeddingDefense(bottom, budget=0.1, seed=4).attach()
    bottom(x)
    state = a.state_dict()
    first = bottom(x).detach()
    a.load_state_dict(state)
    again = bottom(x).detach()
    assert torch.equal(first, again) and a.step == 2


def test_bad_outputs_are_refused() -> None:
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    x = torch.rand(3, 4)
    d = EmbeddingDefense(Pair(), budget=0.1).attach()
    with pytest.raises(DefenseError, match="not one embedding"):
        Pair.__call__(d.bottom, x)
    with pytest.raises(ValueError, match="budget"):
        EmbeddingDefense(bottom_model(), budget=-1.0)
