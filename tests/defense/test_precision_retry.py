"""A float32 estimate that round-off keeps from converging is retaken in float64 on the same probes, not
released under fallback noise; a large model's failure still falls back (a retry would cost a second full
estimate there)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from inject import wrap_estimate
from torch import nn

from invdefend import GradientDefense, spectral
from invdefend.jacobian import gradient_jacobian
from invdefend.spectral import SpectrumTracker, check_estimate


def _confident(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A classifier whose two samples are predicted with a logit margin of at least 16: their gradients are
    differences of nearly equal terms (1 − p ≈ 1e-7), where float32 round-off dominates the Jacobian."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(2, 20)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        top2 = logits.topk(2, dim=1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
        model[2].weight.mul_(16 / gap)
        model[2].bias.mul_(16 / gap)
    return model, x, y


def _release(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prepare=None):
    """One protected release by the default defense (``prepare(defense)`` first, if given): the defense, its
    record and the noise it added."""
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=4, probes=2, seed=0, capture=False)
    if prepare is not None:
        prepare(defense)
    defense.capture(x, y)
    model.zero_grad()
    loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = defense.protect()
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) - g
    return defense, record, noise


@pytest.mark.parametrize("seed", [1, 2])
def test_round_off_keeps_the_float32_estimate_untrusted_and_float64_trusts_it(seed: int) -> None:
    model, x, y = _confident(seed)
    errors = {}
    for dtype in (torch.float32, torch.float64):
        op = gradient_jacobian(model, nn.CrossEntropyLoss(), x, y, dtype=dtype)
        spec = SpectrumTracker(4, cold_sweeps=6).estimate(op)
        try:
            check_estimate(spec, 0.5)
            errors[dtype] = None
        except RuntimeError as exc:
            errors[dtype] = str(exc)
    assert errors[torch.float32] is not None and "did not converge" in errors[torch.float32]
    assert errors[torch.float64] is None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # cast copies: the model is untouched


@pytest.mark.parametrize("seed", [1, 2])
def test_the_defense_retakes_it_in_float64_instead_of_falling_back(seed: int) -> None:
    model, x, y = _confident(seed)
    defense, record, noise = _release(model, x, y)
    assert not record.fallback and record.mechanism == "spectral"
    assert record.estimator_start == "cold+float64"
    assert defense.spectrum.left_vectors.dtype == torch.float32  # back in the model's dtype for the draws
    assert record.relative_energy == pytest.approx(record.budget, rel=0.5) and float(noise.norm()) > 0


@pytest.mark.parametrize("large", [False, True])
def test_an_estimate_untrusted_in_float64_too_falls_back_and_a_large_model_is_not_retried(
        monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    if large:
        monkeypatch.setattr(spectral, "IMAGE_BYTES", 0)  # every operator counts as large: no cheap retry
    model, x, y = _confident(1)
    dtypes: list[torch.dtype] = []

    def untrusted(spec):  # every estimate, float32 or float64, reports a residual far above the threshold
        dtypes.append(spec.singular_values.dtype)
        return replace(spec, residuals=torch.full_like(spec.residuals, 10.0))

    _, record, noise = _release(model, x, y, prepare=lambda defense: wrap_estimate(defense, untrusted))
    assert record.fallback and "did not converge" in record.fallback_reason
    assert float(noise.norm()) > 0  # fail closed: the fallback's isotropic noise
    assert dtypes == ([torch.float32] if large else [torch.float32, torch.float64])
