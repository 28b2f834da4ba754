"""Tests for invdefend.metrics: MSE, PSNR, SSIM (checked against an independent scipy reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from invdefend.metrics import gaussian_window, matched_psnr, mse, psnr, ssim


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ssim_reference(a: np.ndarray, b: np.ndarray, radius: int, data_range: float = 1.0) -> float:
    """Wang et al. SSIM of one (C, H, W) pair with scipy's Gaussian filter (sigma 1.5), valid region only."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    truncate = (radius - 0.25) / 1.5  # scipy's radius is int(truncate * sigma + 0.5)
    assert int(truncate * 1.5 + 0.5) == radius
    vals = []
    for ca, cb in zip(a, b):
        f = lambda t: gaussian_filter(t, sigma=1.5, truncate=truncate, mode="constant")  # noqa: E731
        mu_a, mu_b = f(ca), f(cb)
        saa = f(ca * ca) - mu_a**2
        sbb = f(cb * cb) - mu_b**2
        sab = f(ca * cb) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
        vals.append(s[radius:-radius, radius:-radius])
    return float(np.mean(vals))


def test_mse_and_psnr_shapes() -> None:
    a, b = _images((4, 3, 8, 8), 0), _images((4, 3, 8, 8), 1)
    assert mse(a, b).shape == (4,)
    assert psnr(a, b).shape == (4,)
    assert psnr(a[0], b[0]).shape == ()
    assert mse(a.flatten(1), b.flatten(1)).shape == (4,)  # (B, d) rows are batched


def test_psnr_identical_is_inf_and_cap() -> None:
    a = _images((2, 3, 8, 8))
    assert torch.isinf(psnr(a, a)).all()
    assert torch.equal(psnr(a, a, max_db=100.0), torch.full((2,), 100.0, dtype=torch.float64))


def test_psnr_mse_relation_and_range() -> None:
    a, b = _images((5, 1, 6, 6), 2), _images((5, 1, 6, 6), 3)
    err = ((a - b) ** 2).reshape(5, -1).mean(1)
    assert torch.allclose(mse(a, b), err)
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1.0 / err))
    # scaling the images and the data range together leaves PSNR unchanged
    assert torch.allclose(psnr(255 * a, 255 * b, data_range=255.0), psnr(a, b))
    # a known case: constant error 0.1 -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(a, a + 0.1), torch.full((5,), 20.0, dtype=torch.float64))


def test_gaussian_window_normalised() -> None:
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert float(w[5, 5]) == float(w.max())


def test_ssim_identical_is_one() -> None:
    a = _images((3, 3, 16, 16))
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert ssim(a[0], a[0]).shape == ()


def test_ssim_decreases_with_noise() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.linspace(0, 1, 32, dtype=torch.float64).expand(3, 32, 32).clone()[None]  # smooth ramp
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    values = [float(ssim(x + s * noise, x)[0]) for s in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert values[0] == pytest.approx(1.0)
    assert all(v1 > v2 for v1, v2 in zip(values, values[1:]))


@pytest.mark.parametrize("side,radius", [(16, 5), (8, 3)])
def test_ssim_matches_scipy_reference(side: int, radius: int) -> None:
    a, b = _images((2, 3, side, side), 5), _images((2, 3, side, side), 6)
    b = 0.6 * a + 0.4 * b  # correlated pair, SSIM well inside (0, 1)
    ours = ssim(a, b)
    for i in range(2):
        ref = _ssim_reference(a[i].numpy(), b[i].numpy(), radius)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)
        assert 0.1 < ref < 0.95


def test_matched_psnr_undoes_permutation() -> None:
    a = _images((4, 3, 8, 8), 7)
    rec = (a + 0.01 * _images((4, 3, 8, 8), 8))[torch.tensor([2, 0, 3, 1])]
    direct = psnr(a + 0.01 * _images((4, 3, 8, 8), 8), a)
    assert torch.allclose(matched_psnr(rec, a), direct)
    assert (psnr(rec, a) < direct).any()


def test_metric_errors_name_the_module() -> None:
    a = _images((2, 3, 8, 8))
    with pytest.raises(ValueError, match="invdefend.metrics.psnr"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, data_range=0.0)
    with pytest.raises(ValueError, match="invdefend.metrics.ssim"):
        ssim(a.flatten(), a.flatten())
