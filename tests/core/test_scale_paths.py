"""The memory-lean paths large models take give the small models' answers: chunked products, the lean
Krylov sweep that keeps no images, InvRE without left vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invdefend import spectral
from invdefend.jacobian import gradient_jacobian
from invdefend.prior import GaussianPrior
from invdefend.spectral import topk_spectrum
from invdefend.whitened import WhitenedOperator


def _op(B: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    X, Y = torch.randn(B, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
    return gradient_jacobian(model, nn.CrossEntropyLoss(), X, Y)


@pytest.mark.parametrize("chunk_columns", [1, 2, 5, 7])
def test_chunked_products_equal_the_whole_block(chunk_columns: int):
    op = _op()
    V = torch.randn(3, op.in_dim, 6, dtype=torch.float64)
    U = torch.randn(3, op.out_dim, 6, dtype=torch.float64)
    whole = op.matvec(V), op.rmatvec(U), op.gram_matvec(V)
    op.chunk_bytes = chunk_columns * op.column_bytes  # at most chunk_columns columns per vmapped call
    calls = []
    real = op._apply_chunk
    op._apply_chunk = lambda f, rows, block: calls.append(block.shape[0] * block.shape[2]) or real(f, rows, block)
    chunked = op.matvec(V), op.rmatvec(U), op.gram_matvec(V)
    assert max(calls) <= max(chunk_columns, 1) and len(calls) > 3
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked[2], op.rmatvec(op.matvec(V)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("whitened", [False, True])
def test_the_lean_krylov_sweep_matches_the_one_that_keeps_images(monkeypatch, whitened: bool):
    op = _op()
    if whitened:
        gen = torch.Generator().manual_seed(1)
        op = WhitenedOperator(op, GaussianPrior.fit(torch.randn(200, op.in_dim, generator=gen, dtype=torch.float64)
                                                    .reshape(200, 2, 5, 5), rank=8))
    kept = topk_spectrum(op, 5, oversample=3, max_sweeps=4, tol=1e-10, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(spectral, "IMAGE_BYTES", 0)
    lean = topk_spectrum(op, 5, oversample=3, max_sweeps=4, tol=1e-10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lean.singular_values, kept.singular_values, rtol=1e-8, atol=1e-10)
    # the same directions (up to sign)
    overlap = (lean.left_vectors * kept.left_vectors).sum(1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=1e-6, atol=1e-6)
    none = topk_spectrum(op, 5, oversample=3, max_sweeps=4, tol=1e-10, generator=torch.Generator().manual_seed(2),
                         left=False)
    assert none.left_vectors is None
    torch.testing.assert_close(none.singular_values, kept.singular_values, rtol=1e-8, atol=1e-10)
