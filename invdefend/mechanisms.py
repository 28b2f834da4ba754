"""Noise allocations and noise sources: turn a spectrum and a budget (or a risk target) into noise.

Water-filling (THEORY §4): maximise ``Σ_i 1/(s_i²/(b+τ_i) + 1/v0)`` subject to ``Σ τ_i ≤ E`` where ``b`` is
noise already present in every direction (the attacker-precision reference). Each term is concave in
``τ_i``; the KKT conditions give one water level ``c``:

    τ_i = ( v0 · s_i · (c − s_i) − b )_+

so no noise goes to directions too strong to hide at this budget (``s_i ≥ c``) and the budget reaches the
weakest held directions first. ``c`` is found by bisection to meet the energy ``E`` (budget mode) or the
smallest energy whose InvLoss reaches a target (target mode).

Noise sources: :class:`SeededNoise` (a ``torch.Generator``: reproducible, checkpointable) and
:class:`SecureNoise` (``os.urandom`` through Box–Muller: not reproducible, for production).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .jacobian import JacobianOperator

__all__ = [
    "water_filling",
    "water_filling_at_level",
    "water_filling_for_target",
    "NoiseSource",
    "SeededNoise",
    "SecureNoise",
    "make_noise_source",
    "shaped_noise",
    "band_pass_noise",
    "placement_variances",
]


def water_filling_at_level(singular_values: Tensor, level: Tensor, v0: float, base: Tensor | float = 0.0) -> Tensor:
    """``τ_i = (v0·s_i·(c − s_i) − base)_+`` for a water level ``c`` per sample (``(B,)``)."""
    s = singular_values
    base_t = torch.as_tensor(base, dtype=s.dtype, device=s.device)
    if base_t.dim() == 1:
        base_t = base_t.unsqueeze(-1)
    return (v0 * s * (level.unsqueeze(-1) - s) - base_t).clamp_min(0.0)


def water_filling(
    singular_values: Tensor,
    energy: Tensor | float,
    v0: float,
    base: Tensor | float = 0.0,
    *,
    iterations: int = 100,
) -> Tensor:
    """Water-filling variances ``(B, k)`` whose sum is ``energy`` per sample (``(B,)`` or scalar).

    Args:
        singular_values: ``(B, k)`` (or ``(k,)``) top singular values of each sample's Jacobian.
        energy: noise energy ``Σ τ_i`` to place per sample, in absolute units (> 0).
        v0: prior variance per input coordinate.
        base: variance already present in every direction (e.g. the reference attacker precision).
    """
    s = singular_values if singular_values.dim() == 2 else singular_values.unsqueeze(0)
    E = torch.as_tensor(energy, dtype=s.dtype, device=s.device).expand(s.shape[0])
    if not torch.isfinite(E).all() or (E < 0).any():
        raise ValueError(f"invdefend.mechanisms.water_filling: energy must be finite and >= 0, got {E.tolist()}")
    if v0 <= 0:
        raise ValueError(f"invdefend.mechanisms.water_filling: v0={v0} must be > 0")
    if not torch.isfinite(s).all():
        raise ValueError("invdefend.mechanisms.water_filling: singular values contain NaN/Inf")
    s64, E64 = s.double(), E.double()
    base64 = torch.as_tensor(base, dtype=torch.float64, device=s.device)
    if base64.dim() == 1:
        base64 = base64.unsqueeze(-1)
    # The level at which direction i starts receiving noise: v0 s (c - s) = base -> c = s + base/(v0 s).
    s_pos = s64.clamp_min(torch.finfo(torch.float64).tiny)
    onset = s_pos + base64 / (v0 * s_pos)
    lo = onset.min(dim=-1).values
    hi = onset.max(dim=-1).values + E64 / (v0 * s_pos.sum(dim=-1)) + 1e-12
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        placed = water_filling_at_level(s64, mid, v0, base64).sum(dim=-1)
        too_much = placed > E64
        hi = torch.where(too_much, mid, hi)
        lo = torch.where(too_much, lo, mid)
    tau = water_filling_at_level(s64, hi, v0, base64)
    total = tau.sum(dim=-1, keepdim=True)
    tau = torch.where(total > 0, tau * (E64.unsqueeze(-1) / total.clamp_min(1e-300)), tau)
    out = tau.to(s.dtype)
    return out if singular_values.dim() == 2 else out[0]


def water_filling_for_target(
    singular_values: Tensor,
    invloss_of: Callable[[Tensor], Tensor],
    target_invloss: Tensor | float,
    v0: float,
    base: Tensor | float = 0.0,
    *,
    max_energy: Tensor | float,
    iterations: int = 60,
) -> tuple[Tensor, Tensor]:
    """The smallest water-filling allocation whose InvLoss reaches ``target_invloss``.

    Args:
        singular_values: ``(B, k)``.
        invloss_of: maps variances ``(B, k)`` on the held directions to InvLoss ``(B,)`` (tail included).
        target_invloss: InvLoss to reach per sample.
        max_energy: the largest energy allowed per sample; where even that misses the target, the
            allocation at ``max_energy`` is returned and ``reached`` is False for that sample.

    Returns:
        ``(tau, reached)``: variances ``(B, k)`` and a ``(B,)`` bool.
    """
    s = singular_values
    target = torch.as_tensor(target_invloss, dtype=torch.float64, device=s.device).expand(s.shape[0])
    cap = torch.as_tensor(max_energy, dtype=s.dtype, device=s.device).expand(s.shape[0])
    tau_cap = water_filling(s, cap, v0, base)
    reached = invloss_of(tau_cap).double() >= target
    lo = torch.zeros_like(cap, dtype=torch.float64)
    hi = cap.double().clone()
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        ok = invloss_of(water_filling(s, mid.to(s.dtype), v0, base)).double() >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    tau = water_filling(s, hi.to(s.dtype), v0, base)
    tau = torch.where(reached.unsqueeze(-1), tau, tau_cap)
    return tau, reached


class NoiseSource(Protocol):
    """Where Gaussian noise comes from."""

    reproducible: bool

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples."""

    def state_dict(self) -> dict:
        """State to checkpoint (empty for non-reproducible sources)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class SeededNoise:
    """Reproducible noise from an explicit ``torch.Generator`` (CPU generator; samples moved to device)."""

    reproducible = True

    def __init__(self, generator: torch.Generator | None = None, seed: int | None = None) -> None:
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        elif seed is not None:
            raise ValueError("invdefend.mechanisms.SeededNoise: pass a generator or a seed, not both")
        self.generator = generator

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples drawn from the generator."""
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device).to(device)

    def state_dict(self) -> dict:
        """The generator state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator state."""
        self.generator.set_state(state["generator"])


class SecureNoise:
    """Gaussian noise from the operating system's CSPRNG (``os.urandom``) by the Box–Muller transform.

    Not reproducible by design: the same seed does not exist, and checkpoints hold no noise state.
    """

    reproducible = False

    def __init__(self) -> None:
        warnings.warn(
            "invdefend: secure RNG mode draws noise from os.urandom; releases are NOT reproducible and "
            "a resumed run will not repeat the noise of an uninterrupted one",
            UserWarning,
            stacklevel=3,
        )

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples from ``os.urandom``."""
        n = int(np.prod(shape)) if shape else 1
        half = (n + 1) // 2
        raw = np.frombuffer(os.urandom(16 * half), dtype=np.uint64).reshape(2, half)
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        return torch.from_numpy(z.reshape(shape)).to(dtype=dtype, device=device)

    def state_dict(self) -> dict:
        """Nothing: secure noise has no reproducible state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


def make_noise_source(generator: torch.Generator | None = None, seed: int | None = None, secure: bool = False) -> NoiseSource:
    """A :class:`SecureNoise` when ``secure`` (generator/seed must then be None), else :class:`SeededNoise`."""
    if secure:
        if generator is not None or seed is not None:
            raise ValueError("invdefend.mechanisms: secure_rng=True cannot take a generator or a seed")
        return SecureNoise()
    return SeededNoise(generator, seed)


def shaped_noise(basis: Tensor, variances: Tensor, source: NoiseSource) -> Tensor:
    """``Σ_i sqrt(τ_i)·z_i·u_i`` with ``z ~ N(0, I)``: noise of variance ``τ_i`` along each column ``u_i``.

    ``basis`` is ``(..., m, k)`` and ``variances`` ``(..., k)``; the result is ``(..., m)``.
    """
    z = source.normal(tuple(variances.shape), basis.dtype, basis.device)
    return (basis @ (variances.clamp_min(0).sqrt() * z).unsqueeze(-1)).squeeze(-1)


def band_pass_noise(
    op: JacobianOperator,
    mu: Tensor | float | None,
    scale: Tensor | float,
    source: NoiseSource,
    *,
    steps: int = 24,
    mu_quantile: float = 0.25,
    return_mu: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Matrix-function noise ``δ = scale · J·g(JᵀJ)·w`` with ``g(λ) = 1/(λ + μ)`` and ``w ~ N(0, I_d)``.

    Its variance along ``u_i`` is ``scale²·s_i²·g(s_i²)²`` (THEORY §4): largest for ``s_i² ≈ μ``, small for
    directions far stronger or weaker. ``g(JᵀJ)w`` is applied by Lanczos on ``JᵀJ`` (``steps`` products) with
    no SVD. Returns ``(B, m)``.

    Args:
        mu: ``μ`` (a scalar or one per sample, ``(B,)``); ``None`` to choose it per sample as the
            ``mu_quantile`` quantile of the non-zero eigenvalues of ``JᵀJ`` (the squared singular values
            ``s_i²``), estimated at no extra cost from the same Lanczos run by stochastic Lanczos quadrature:
            the spectral measure is approximated by the Ritz values ``θ_j`` of the tridiagonal ``T`` with
            weights ``Y[0, j]²`` (one random start vector, so the estimate is a noisy one: with ``steps = d``
            the ``θ_j`` are exact eigenvalues but their weights are ``(u_jᵀw)²/‖w‖²``, not ``1/d``). Ritz
            values ``≤ 1e-10·θ_max`` count as zero and are left out (weights renormalised); the quantile is the
            smallest ``θ_j`` whose cumulative weight reaches ``mu_quantile``. A sample whose Jacobian is zero
            gets ``μ = 1`` (its noise is zero whatever ``μ``).
        mu_quantile: in ``(0, 1)``; used only when ``mu`` is None.
        return_mu: also return the ``μ`` used, ``(B,)`` float64.
    """
    if isinstance(mu_quantile, bool) or not isinstance(mu_quantile, (int, float)) or not 0.0 < mu_quantile < 1.0:
        raise ValueError(
            f"invdefend.mechanisms.band_pass_noise: mu_quantile={mu_quantile!r} must be a number in (0, 1) "
            "(e.g. 0.25 for the 25th percentile of the non-zero s²)"
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"invdefend.mechanisms.band_pass_noise: steps={steps!r} must be an integer >= 1")
    steps = int(steps)
    B, d = op.batch_size, op.in_dim
    w = source.normal((B, d, 1), op.dtype, op.device)
    wnorm = w.norm(dim=1, keepdim=True)
    q = w / wnorm
    Qs, alphas, betas = [q], [], []
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(B, 1, 1, dtype=op.dtype, device=op.device)
    steps = min(steps, d)
    for j in range(steps):
        v = op.rmatvec(op.matvec(q))
        alpha = (v * q).sum(dim=1, keepdim=True)
        v = v - alpha * q - beta * q_prev
        Qm = torch.cat(Qs, dim=2)
        for _ in range(2):
            v = v - Qm @ (Qm.transpose(1, 2) @ v)
        alphas.append(alpha.view(B))
        beta = v.norm(dim=1, keepdim=True)
        if j == steps - 1 or bool((beta < 1e-12 * alpha.abs().clamp_min(1e-30)).all()):
            break
        betas.append(beta.view(B))
        q_prev, q = q, v / beta.clamp_min(torch.finfo(op.dtype).tiny)
        Qs.append(q)
    n = len(alphas)
    T = torch.diag_embed(torch.stack(alphas, -1).double())
    if n > 1:
        off = torch.stack(betas[: n - 1], -1).double()
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, Y = torch.linalg.eigh(T)
    if mu is None:
        mu_t = _quadrature_quantile(theta, Y[:, 0, :].pow(2), float(mu_quantile)).reshape(-1, 1)
    else:
        mu_t = torch.as_tensor(mu, dtype=torch.float64, device=theta.device).reshape(-1, 1)
    coeff = Y @ ((Y[:, 0, :] / (theta.clamp_min(0) + mu_t)).unsqueeze(-1))  # g(T) e1
    gw = torch.cat(Qs[:n], dim=2) @ coeff.to(op.dtype) * wnorm
    delta = op.matvec(gw).squeeze(-1)
    delta = delta * torch.as_tensor(scale, dtype=op.dtype, device=op.device).reshape(-1, 1)
    if return_mu:
        return delta, mu_t.reshape(-1).expand(B).clone()
    return delta


def _quadrature_quantile(theta: Tensor, weights: Tensor, q: float) -> Tensor:
    """Per row, the ``q`` quantile of the discrete measure ``Σ_j weights_j δ(θ_j)`` restricted to its
    non-zero support (``θ > 1e-10·θ_max``, weights renormalised): the smallest ``θ_j`` whose cumulative
    weight reaches ``q``. Rows without a non-zero ``θ`` get 1. ``theta``, ``weights``: ``(B, n)``; returns
    ``(B,)`` float64."""
    theta, weights = theta.double(), weights.double()
    top = theta.max(dim=-1, keepdim=True).values
    keep = (theta > 1e-10 * top) & (theta > 0)
    w = torch.where(keep, weights, torch.zeros_like(weights))
    order = theta.argsort(dim=-1)
    th_sorted, w_sorted = theta.gather(-1, order), w.gather(-1, order)
    total = w_sorted.sum(dim=-1, keepdim=True)
    cdf = w_sorted.cumsum(dim=-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # First kept index whose cumulative weight reaches q (a tiny slack for rounding).
    reached = (cdf >= q - 1e-12) & keep.gather(-1, order)
    first = reached.to(torch.int8).argmax(dim=-1)  # 0 where nothing is reached (then replaced below)
    mu = th_sorted.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    ok = reached.any(dim=-1) & (total.squeeze(-1) > 0) & torch.isfinite(mu) & (mu > 0)
    return torch.where(ok, mu, torch.ones_like(mu))


def placement_variances(
    singular_values: Tensor,
    energy: Tensor | float,
    placement: str,
    *,
    fraction: float = 0.25,
    percentile: float = 25.0,
    mu: Tensor | float | None = None,
) -> Tensor:
    """Per-direction noise variances ``τ_i`` (along the left singular vectors ``u_i``) of a spectral placement.

    ``singular_values`` ``(B, k)`` (zeros mark directions outside range(J) and get no noise); every row's
    variances sum to ``energy`` ``(B,)`` (or a scalar). Placements (frontier study, ``docs/frontier.md``):

    * ``"weak25"`` (``fraction``): equal variance on the weakest ``fraction`` of the non-zero directions;
    * ``"band_pass"`` (``percentile``): ``τ_i ∝ s_i²/(s_i² + μ)²`` with ``μ`` the ``percentile``-th percentile
      of the non-zero ``s_i²`` — the law of :func:`band_pass_noise` along ``u_i``; or the given ``mu`` (a
      scalar or one per row), e.g. the one a :class:`~invdefend.defense.GradientDefense` draw used.
    """
    if singular_values.dim() != 2:
        raise ValueError(
            f"invdefend.mechanisms.placement_variances: singular_values must be (B, k), got {tuple(singular_values.shape)}"
        )
    if not 0.0 < fraction <= 1.0 or not 0.0 < percentile < 100.0:
        raise ValueError(
            f"invdefend.mechanisms.placement_variances: need 0 < fraction <= 1 and 0 < percentile < 100, got "
            f"fraction={fraction}, percentile={percentile}"
        )
    s = singular_values
    B = s.shape[0]
    e = torch.as_tensor(energy, dtype=s.dtype, device=s.device).expand(B) if not isinstance(energy, Tensor) or energy.dim() == 0 else energy.to(s.dtype)
    if e.shape != (B,) or bool((e < 0).any()):
        raise ValueError(
            f"invdefend.mechanisms.placement_variances: energy must be >= 0, a scalar or shaped ({B},), got {tuple(e.shape)}"
        )
    valid = s > 0
    if not bool(valid.any(dim=1).all()):
        raise ValueError("invdefend.mechanisms.placement_variances: a row has no non-zero singular value")
    if placement == "weak25":
        n_valid = valid.sum(dim=1, keepdim=True)
        n_weak = torch.clamp((n_valid.to(torch.float64) * fraction).ceil().long(), min=1)
        rank = torch.where(valid, s, torch.full_like(s, float("inf"))).argsort(dim=1).argsort(dim=1)  # 0 = weakest
        shape = ((rank < n_weak) & valid).to(s.dtype)
    elif placement == "band_pass":
        s2 = s.pow(2)
        if mu is None:
            mu_b = torch.stack([torch.quantile(s2[b][valid[b]].double(), percentile / 100.0) for b in range(B)])
        else:
            mu_b = torch.as_tensor(mu, dtype=torch.float64, device=s.device).reshape(-1).expand(B)
        shape = torch.where(valid, s2 / (s2 + mu_b.to(s.dtype).unsqueeze(1)).pow(2), torch.zeros_like(s))
    else:
        raise ValueError(
            f"invdefend.mechanisms.placement_variances: placement={placement!r}; choose 'weak25' or 'band_pass'"
        )
    return shape * (e / shape.sum(dim=1)).unsqueeze(1)
