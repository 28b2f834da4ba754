"""Property-based sweeps (hypothesis) over shapes, dtypes, budgets and batch sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from invdefend import EmbeddingDefense, GradientDefense, InvRE, embedding_jacobian, gradient_jacobian
from invdefend.models import MLP, uniform_init_

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dtypes = st.sampled_from([torch.float32, torch.float64])
batch_sizes = st.integers(min_value=1, max_value=5)
sample_shapes = st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3).map(tuple)
valid_budgets = st.floats(min_value=1e-3, max_value=2.0)
invalid_budgets = st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf])
)


def _classifier(in_features: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    model = MLP(in_features, hidden=(4,), out_features=3, activation="tanh")
    return uniform_init_(model, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_mean_energy(energies: list[float], budget: float) -> None:
    """The mean released energy equals the budget within 5 standard errors (at least 15 %): the draws are
    chi-square with as few degrees of freedom as the directions that receive noise, so the tolerance
    follows their observed spread."""
    t = torch.tensor(energies, dtype=torch.float64)
    assert bool((t > 0).all())
    stderr = float(t.std()) / math.sqrt(len(energies))
    assert abs(float(t.mean()) - budget) < max(0.15 * budget, 5 * stderr), (float(t.mean()), budget, stderr)


def _batch(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


@SETTINGS
@given(shape=sample_shapes, n=batch_sizes, dtype=dtypes)
def test_jacobian_products_are_adjoint_for_any_shape(shape, n, dtype):
    d = math.prod(shape)
    model = _classifier(d, dtype)
    x, y = _batch(shape, n, dtype)
    op = gradient_jacobian(model, nn.CrossEntropyLoss(), x, y)
    assert (op.batch_size, op.in_dim, op.out_dim) == (n, d, sum(p.numel() for p in model.parameters()))
    g = torch.Generator().manual_seed(1)
    V = torch.randn(n, d, 2, generator=g, dtype=dtype)
    U = torch.randn(n, op.out_dim, 2, generator=g, dtype=dtype)
    JV, JtU = op.matvec(V), op.rmatvec(U)
    assert JV.shape == (n, op.out_dim, 2) and JtU.shape == (n, d, 2) and JV.dtype == dtype
    lhs, rhs = (JV * U).sum(dim=1), (V * JtU).sum(dim=1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(lhs, rhs, rtol=tol, atol=tol)
    emb = embedding_jacobian(_classifier(d, dtype), x)
    assert emb.matvec(V).shape == (n, 3, 2)


@SETTINGS
@given(n=batch_sizes, chunk=st.integers(min_value=1, max_value=3), dtype=dtypes)
def test_invre_results_do_not_depend_on_chunking(n, chunk, dtype):
    model = _classifier(6, dtype)
    x, y = _batch((6,), n, dtype)
    whole = InvRE(model, nn.CrossEntropyLoss(), k=3, method="exact", batch_size=n).assess(x, y)
    parts = InvRE(model, nn.CrossEntropyLoss(), k=3, method="exact", batch_size=chunk).assess(x, y)
    assert parts.n_samples == whole.n_samples == n
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(
        torch.tensor(parts.singular_values), torch.tensor(whole.singular_values), rtol=tol, atol=0
    )
    assert all(math.isfinite(v) for v in parts.predicted_psnr)


@SETTINGS
@given(n=batch_sizes, budget=valid_budgets, dtype=dtypes, mechanism=st.sampled_from(["spectral", "isotropic"]))
def test_gradient_defense_noise_energy_matches_the_budget(n, budget, dtype, mechanism):
    model, loss = _classifier(6, dtype, seed=n), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=budget, mechanism=mechanism, k=3, refresh_every=10_000, seed=0)
    x, y = _batch((6,), n, dtype, seed=n)
    loss(model(x), y).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    energies = []
    for _ in range(150):  # one estimate, then many draws of the same plan
        for p, g in zip(model.parameters(), clean):
            p.grad = g.clone()
        record = defense.protect()
        assert not record.fallback and record.budget == pytest.approx(budget, rel=1e-6)
        assert all(p.grad.dtype == dtype for p in model.parameters())
        energies.append(record.relative_energy)
    _assert_mean_energy(energies, budget)


@settings(SETTINGS, max_examples=8)
@given(n=batch_sizes, budget=valid_budgets, dtype=dtypes)
def test_embedding_defense_noise_energy_matches_the_budget(n, budget, dtype):
    bottom = uniform_init_(MLP(6, hidden=(), out_features=5, activation="tanh", final_activation=True),
                           generator=torch.Generator().manual_seed(n)).to(dtype)
    defense = EmbeddingDefense(bottom, budget=budget, seed=0)
    x, _ = _batch((6,), n, dtype, seed=n)
    h = bottom(x).detach()
    spec = defense.estimate(x)
    defense.estimate = lambda inputs: spec  # the same batch: estimate once, draw the noise many times
    energies = []
    for _ in range(100):
        noisy = defense.protect(x, h)
        assert noisy.dtype == dtype and noisy.shape == h.shape
        assert not defense.last_record.fallback
        assert defense.last_record.budget == pytest.approx(budget, rel=1e-5)
        energies.append(defense.last_record.relative_energy)
    _assert_mean_energy(energies, budget)


@SETTINGS
@given(budget=invalid_budgets)
def test_invalid_budgets_are_refused_naming_budget(budget):
    model = _classifier(4, torch.float32)
    with pytest.raises(ValueError, match=r"budget=.* must be a finite noise energy > 0"):
        GradientDefense(model, nn.CrossEntropyLoss(), budget=budget)
    with pytest.raises(ValueError, match=r"budget=.* must be a finite noise energy > 0"):
        EmbeddingDefense(model, budget=budget)


@SETTINGS
@given(n=batch_sizes, dtype=dtypes, position=st.integers(min_value=0, max_value=29),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_any_nonfinite_input_entry_is_refused(n, dtype, position, bad):
    x, y = _batch((6,), n, dtype)
    x.view(-1)[position % x.numel()] = bad
    with pytest.raises(ValueError, match=r"inputs contain NaN or Inf"):
        gradient_jacobian(_classifier(6, dtype), nn.CrossEntropyLoss(), x, y)
