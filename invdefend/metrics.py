"""Image-reconstruction metrics: MSE, PSNR and SSIM, per sample.

All functions accept a batch ``(B, C, H, W)`` (or any ``(B, ...)`` for :func:`mse` / :func:`psnr`) and
return one value per sample, shape ``(B,)``; a single image ``(C, H, W)`` gives a 0-d tensor. Both
arguments must have the same shape. Computations run in float64 and come back in that dtype.

Conventions:

* :func:`psnr` of identical images is ``+inf`` (the MSE is exactly 0); pass ``max_db`` to cap it, e.g.
  when averaging over samples.
* :func:`ssim` is Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``,
  ``K2 = 0.03``, Gaussian-weighted (population) statistics, evaluated only where the window fits inside
  the image ("valid"), averaged over positions and channels. Images smaller than 11 pixels on a side use
  the largest odd window that fits (sigma stays 1.5).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mse", "psnr", "ssim", "matched_psnr", "gaussian_window", "PSNR_CAP_DB"]

#: The PSNR every report of the library gives an exact (or near-exact) recovery, so that averages stay finite and
#: figures share one scale: the audit, the demo and the TensorBoard probe image all cap here.
PSNR_CAP_DB: float = 60.0


def _pair(where: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"invdefend.metrics.{where}: both arguments must be torch.Tensor")
    if a.shape != b.shape:
        raise ValueError(
            f"invdefend.metrics.{where}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
            "pass the reconstruction and the original with the same shape"
        )
    if a.dim() == 0:
        raise ValueError(f"invdefend.metrics.{where}: got 0-d tensors; pass images shaped (C, H, W) or (B, C, H, W)")
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def mse(a: Tensor, b: Tensor, *, batched: bool | None = None) -> Tensor:
    """Mean squared error per sample.

    Args:
        a, b: tensors of the same shape.
        batched: whether dim 0 is a batch dimension; by default true for tensors with 4 or more dims or
            exactly 2 dims (``(B, d)`` feature rows), false for ``(C, H, W)`` and 1-d vectors.

    Returns:
        ``(B,)`` for batched input, a 0-d tensor otherwise.
    """
    a, b = _pair("mse", a, b)
    return _mse(a, b, batched)


def _mse(a: Tensor, b: Tensor, batched: bool | None) -> Tensor:
    if batched is None:
        batched = a.dim() >= 4 or a.dim() == 2
    diff2 = (a - b) ** 2
    if batched:
        return diff2.reshape(diff2.shape[0], -1).mean(dim=1)
    return diff2.mean()


def psnr(
    a: Tensor,
    b: Tensor,
    data_range: float = 1.0,
    *,
    max_db: float | None = None,
    batched: bool | None = None,
) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, per sample.

    Identical inputs give ``+inf`` unless ``max_db`` caps the result. ``batched`` is as in :func:`mse`.
    """
    if data_range <= 0:
        raise ValueError(f"invdefend.metrics.psnr: data_range={data_range} must be > 0 (1 for [0,1] images)")
    err = _mse(*_pair("psnr", a, b), batched)
    with torch.no_grad():
        out = 10.0 * torch.log10(data_range**2 / err)  # err == 0 -> +inf
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """A normalised 2-D Gaussian window ``(size, size)`` (separable outer product)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"invdefend.metrics.gaussian_window: size={size} must be a positive odd integer")
    if sigma <= 0:
        raise ValueError(f"invdefend.metrics.gaussian_window: sigma={sigma} must be > 0")
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: Tensor,
    b: Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al., 2004) per sample, in ``[-1, 1]`` (1 for identical images).

    Args:
        a, b: images ``(B, C, H, W)`` or ``(C, H, W)`` (a 2-d ``(H, W)`` image is also accepted).
        data_range: dynamic range ``L`` of the pixels (1 for [0, 1]).
        window_size: Gaussian window side (odd); shrunk to the largest odd size that fits the image.
        sigma: Gaussian window standard deviation.
        k1, k2: stabilising constants, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.

    Returns:
        ``(B,)`` for a batch, a 0-d tensor for a single image.
    """
    a, b = _pair("ssim", a, b)
    if data_range <= 0:
        raise ValueError(f"invdefend.metrics.ssim: data_range={data_range} must be > 0 (1 for [0,1] images)")
    single = a.dim() <= 3
    if a.dim() == 2:
        a, b = a[None, None], b[None, None]
    elif a.dim() == 3:
        a, b = a[None], b[None]
    elif a.dim() != 4:
        raise ValueError(
            f"invdefend.metrics.ssim: expected (B, C, H, W), (C, H, W) or (H, W), got shape {tuple(a.shape)}"
        )
    _, c, h, w = a.shape
    size = min(window_size, h, w)
    if size % 2 == 0:
        size -= 1
    win = gaussian_window(size, sigma).expand(c, 1, size, size)

    def filt(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, win, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    out = (num / den).flatten(1).mean(dim=1)
    return out[0] if single else out


def matched_psnr(reconstruction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR per target sample after pairing reconstructions to targets optimally (batch attacks).

    Attacks on a batch recover the samples in an arbitrary order; this finds the assignment maximising
    the total PSNR (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) and returns, for each
    target ``j``, the PSNR of the reconstruction assigned to it: shape ``(B,)``.
    """
    from scipy.optimize import linear_sum_assignment

    r, t = _pair("matched_psnr", reconstruction, target)
    if r.dim() < 2:
        raise ValueError("invdefend.metrics.matched_psnr: pass batches shaped (B, ...)")
    n = r.shape[0]
    rf, tf = r.reshape(n, -1), t.reshape(n, -1)
    err = torch.cdist(rf, tf) ** 2 / rf.shape[1]  # (n, n): mse of reconstruction i vs target j
    cost = torch.log10(err.clamp_min(torch.finfo(torch.float64).tiny))  # min total log-MSE = max total PSNR
    rows, cols = linear_sum_assignment(cost.numpy())
    matched = torch.empty(n, dtype=torch.float64)
    matched[torch.as_tensor(cols)] = err[torch.as_tensor(rows), torch.as_tensor(cols)]
    return 10.0 * torch.log10(data_range**2 / matched)

