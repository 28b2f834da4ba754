"""Dtypes: float32 and float64 work end to end; half precision is refused clearly, before any release."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from invdefend import DefenseError, EmbeddingDefense, GradientDefense, InvRE, exact_spectrum, gradient_jacobian

FLOATS = [torch.float32, torch.float64]
HALVES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
def test_invre_in_float32_and_float64(kit, dtype):
    model = kit.make_classifier(dtype=dtype)
    x, y = kit.make_batch(3, dtype=dtype)
    loss = nn.CrossEntropyLoss()
    spec = InvRE(model, loss, k=4).spectrum(x, y)
    assert spec.singular_values.dtype == dtype
    exact = exact_spectrum(gradient_jacobian(model, loss, x, y), 4)
    rtol = 1e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(spec.singular_values, exact.singular_values, rtol=rtol, atol=0.0)
    report = InvRE(model, loss, k=4).assess(x, y)
    assert all(map(torch.isfinite, torch.tensor(report.predicted_psnr)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gradient_defense_in_float32_and_float64(kit, dtype):
    model, loss = kit.make_classifier(dtype=dtype), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.1, k=4, refresh_every=2, seed=0)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    for step in range(3):
        x, y = kit.make_batch(4, seed=step, dtype=dtype)
        opt.zero_grad()
        loss(model(x), y).backward()
        clean = kit.flat_grad(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback in either precision
            opt.step()
        released = kit.flat_grad(model)
        assert released.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
        assert not torch.equal(released, clean) and bool(torch.isfinite(released).all())
        assert not defense.last_record.fallback


@pytest.mark.parametrize("dtype", FLOATS)
def test_embedding_defense_in_float32_and_float64(kit, dtype):
    bottom = kit.make_bottom(dtype=dtype)
    defense = EmbeddingDefense(bottom, budget=0.1, seed=0).attach()
    x, _ = kit.make_batch(4, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        h = bottom(x)
    assert h.dtype == dtype and not defense.last_record.fallback
    assert defense.last_record.relative_energy > 0


@pytest.mark.parametrize("half", HALVES)
def test_half_precision_model_is_refused_at_construction(kit, half):
    pattern = r"has half-precision parameters .*float32 or float64.*\.float\(\)"
    with pytest.raises(TypeError, match=r"GradientDefense: MLP " + pattern):
        GradientDefense(kit.make_classifier().to(half), nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"EmbeddingDefense: MLP " + pattern):
        EmbeddingDefense(kit.make_bottom().to(half))
    x, y = kit.make_batch(2)
    with pytest.raises(TypeError, match=r"gradient_jacobian: MLP " + pattern):
        InvRE(kit.make_classifier().to(half), nn.CrossEntropyLoss(), k=2).assess(x, y)


@pytest.mark.parametrize("half", HALVES)
def test_half_precision_inputs_are_refused(kit, half):
    x, y = kit.make_batch(2)
    with pytest.raises(TypeError, match=r"half-precision inputs .* cast to float32 or float64"):
        InvRE(kit.make_classifier(), nn.CrossEntropyLoss(), k=2).assess(x.to(half), y)
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    loss(model(x), y).backward()
    defense.capture(x.to(half), y)  # e.g. an autocast pipeline that kept the half-precision batch
    before = kit.flat_grad(model)
    with pytest.raises(DefenseError, match=r"GradientDefense: half-precision inputs .*nothing was released"):
        defense.protect()
    assert torch.equal(kit.flat_grad(model), before)


def test_mixed_model_and_input_precision_is_refused_with_the_fix(kit):
    x, y = kit.make_batch(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"inputs are torch\.float64 but MLP's parameters are torch\.float32"):
        InvRE(kit.make_classifier(), nn.CrossEntropyLoss(), k=2).assess(x, y)
