"""Fail closed: an estimator failure never lets an unprotected gradient or embedding out.

Failures are injected on chosen steps in three ways — the estimator raises (through the defense's ``estimator`` seam), returns a
NaN spectrum, or does not converge (huge residuals) — and every step of a short training run is checked:
the released quantity differs from the true one; on the failed steps it carries the conservative isotropic
noise (relative energy ≈ ``fallback_budget``), a ``RuntimeWarning`` was issued, a ``fallback=True`` record
was emitted, and each failed estimate logged a WARNING on the ``invdefend`` logger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from inject import wrap_estimate

from invdefend import DefenseError, EmbeddingDefense, GradientDefense

STEPS = 10
FAIL = {1, 4, 5, 8}
FALLBACK = 0.5
KINDS = ["raise", "nan", "diverge"]


def _inject(kind: str, defense) -> None:
    """Make the defense's estimate fail on the steps in FAIL, in the way ``kind`` says, through its public
    ``estimator`` seam."""

    def broken(spec):
        if defense.step not in FAIL:
            return spec
        if kind == "raise":
            raise RuntimeError("injected estimator failure")
        if kind == "nan":
            return dataclasses.replace(spec, singular_values=torch.full_like(spec.singular_values, math.nan))
        return dataclasses.replace(spec, residuals=torch.full_like(spec.singular_values, 1e6))  # diverged

    wrap_estimate(defense, broken)


def _fallback_warnings(caught: list) -> list:
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "estimation failed" in str(w.message)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("refresh_every", [1, 4])
def test_gradient_defense_never_releases_an_unprotected_gradient(kit, kind, refresh_every, monkeypatch, caplog):
    model, loss = kit.make_classifier(seed=1), nn.CrossEntropyLoss()
    defense = GradientDefense(
        model, loss, budget=0.05, fallback_budget=FALLBACK, k=4, refresh_every=refresh_every, seed=0
    )
    _inject(kind, defense)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.05))  # SGD leaves .grad as released
    caplog.set_level(logging.WARNING, logger="invdefend")
    for step in range(STEPS):
        x, y = kit.make_batch(6, seed=100 + step)
        opt.zero_grad()
        loss(model(x), y).backward()
        true = kit.flat_grad(model)
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        released, record = kit.flat_grad(model), defense.last_record
        assert record.step == step
        noise_energy = float((released - true).double().pow(2).sum())
        ratio = noise_energy / float(true.double().pow(2).sum())
        assert noise_energy > 0, f"step {step}: the true gradient was released"
        if record.fallback:
            # isotropic noise over m coordinates: ratio/FALLBACK ~ chi2_m/m, m = 99
            assert record.mechanism == "fallback" and record.budget == FALLBACK
            assert 0.5 < ratio / FALLBACK < 1.6, (step, ratio)
            assert record.relative_energy == pytest.approx(ratio, rel=1e-6)
            assert len(_fallback_warnings(caught)) == 1, f"step {step}: no fallback warning"
            # the log gets one event per failed estimate (a step in the retry back-off reuses it)
            logged = [r for r in caplog.records if r.name == "invdefend" and r.levelno == logging.WARNING]
            assert len(logged) == int(record.refreshed)
            assert all("estimation failed" in r.getMessage() for r in logged)
        else:
            assert record.mechanism == "spectral" and record.budget == pytest.approx(0.05, rel=1e-6)
            assert not _fallback_warnings(caught)
        if step in FAIL and record.refreshed:  # an estimate was attempted and failed
            assert record.fallback, f"step {step}: the injected failure did not fall back"
            assert kind != "raise" or "injected estimator failure" in record.fallback_reason
        elif record.refreshed:
            assert not record.fallback, f"step {step}: spurious fallback ({record.fallback_reason})"
    history = defense.monitor.history
    assert [r.step for r in history] == list(range(STEPS))
    failed = {r.step for r in history if r.refreshed and r.step in FAIL}
    assert failed and failed <= {r.step for r in history if r.fallback}


def test_a_failed_refresh_is_retried_at_the_next_step(kit, monkeypatch):
    """Refreshes at 0 and 5 (refresh_every=5); step 5's fails, so step 6 estimates again and succeeds."""
    model, loss = kit.make_classifier(seed=2), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.05, fallback_budget=FALLBACK, k=4, refresh_every=5, seed=0)
    _inject("raise", defense)
    records = []
    for step in range(STEPS):
        x, y = kit.make_batch(6, seed=step)
        model.zero_grad()
        loss(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            records.append(defense.protect())
    assert [r.refreshed for r in records[:7]] == [True, False, False, False, False, True, True]
    assert [r.mechanism for r in records] == ["spectral"] * 5 + ["fallback"] + ["spectral"] * 4
    assert "injected estimator failure" in records[5].fallback_reason


def test_defended_optimizer_does_not_step_when_protection_is_refused(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = kit.make_batch(4)
    loss(model(x), y).backward()
    model.net[3].bias.grad[0] = math.inf
    with pytest.raises(DefenseError):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("mechanism", ["isotropic", "spectral"])  # the default, and the shaped placement
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_defense_protects_every_batch(kit, kind, mechanism, monkeypatch, caplog):
    bottom = kit.make_bottom(seed=3)
    reference = kit.make_bottom(seed=3)  # identical weights, never defended
    # exact_max_dim=0 routes the estimate through the top-k estimator, whose convergence can fail
    defense = EmbeddingDefense(bottom, mechanism=mechanism, budget=0.1, fallback_budget=FALLBACK, k=kit.EMB,
                               exact_max_dim=0, seed=0)
    _inject(kind, defense)
    defense.attach()
    caplog.set_level(logging.WARNING, logger="invdefend")
    for step in range(STEPS):
        x, _ = kit.make_batch(8, seed=200 + step)
        clean = reference(x).detach()
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            released = bottom(x).detach()
        record = defense.last_record
        assert record.step == step
        per_sample = (released - clean).pow(2).sum(dim=1) / clean.pow(2).sum(dim=1)
        assert (per_sample > 0).all(), f"batch {step}: a clean embedding was released"
        if step in FAIL:
            assert record.fallback and record.mechanism == "fallback" and record.budget == FALLBACK
            # per-sample isotropic noise of energy FALLBACK·‖h_i‖²: the batch mean ~ chi2_128/128
            assert 0.6 < float(per_sample.mean()) / FALLBACK < 1.5
            assert record.relative_energy == pytest.approx(float(per_sample.mean()), rel=1e-4)
            assert len(_fallback_warnings(caught)) == 1
            assert any(r.name == "invdefend" and "estimation failed" in r.getMessage() for r in caplog.records)
        else:
            assert not record.fallback and record.mechanism == mechanism
            assert not _fallback_warnings(caught)
    assert sum(r.fallback for r in defense.monitor.history) == len(FAIL)
