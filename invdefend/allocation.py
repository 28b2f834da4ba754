"""Noise allocations: turn a spectrum and an energy (or a risk target) into per-direction variances.

Water-filling (THEORY §4): maximise ``Σ_i 1/(s_i²/(b+τ_i) + 1/v0)`` subject to ``Σ τ_i ≤ E`` where ``b`` is
noise already present in every direction (the attacker-precision reference, an isotropic floor). Each term is
concave in ``τ_i``; the KKT conditions give one water level ``c``:

    τ_i = ( v0 · s_i · (c − s_i) − b )_+

so no noise goes to directions too strong to hide at this budget (``s_i ≥ c``) and the budget reaches the
weakest held directions first. ``c`` is found by bisection to meet the energy ``E`` (budget mode) or the
smallest energy whose InvLoss reaches a target (target mode).

:func:`placement_variances` gives the per-direction variances of the frontier study's fixed-shape placements
(``"weak25"``, ``"band_pass"``), which the audit and the attacks use as the Gaussian law those draws follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["water_filling", "water_filling_at_level", "water_filling_for_target", "placement_variances"]


def water_filling_at_level(
    singular_values: Tensor, level: Tensor, v0: float, base: Tensor | float = 0.0, weights: Tensor | None = None
) -> Tensor:
    """``τ_i = (s̃_i·(c·√w_i − s̃_i) − base)_+`` for a water level ``c`` per sample (``(B,)``), with
    ``s̃_i = √v0·s_i`` and weights ``w_i`` (``v0`` when None, which gives ``v0·s_i·(c − s_i) − base``)."""
    s = singular_values
    base_t = torch.as_tensor(base, dtype=s.dtype, device=s.device)
    if base_t.dim() == 1:
        base_t = base_t.unsqueeze(-1)
    if weights is None:
        return (v0 * s * (level.unsqueeze(-1) - s) - base_t).clamp_min(0.0)
    st = math.sqrt(v0) * s
    return (st * (level.unsqueeze(-1) * weights.to(s).sqrt() - st) - base_t).clamp_min(0.0)


def water_filling(
    singular_values: Tensor,
    energy: Tensor | float,
    v0: float,
    base: Tensor | float = 0.0,
    *,
    weights: Tensor | None = None,
    iterations: int = 100,
) -> Tensor:
    """Water-filling variances ``(B, k)`` whose sum is ``energy`` per sample (``(B,)`` or scalar).

    Args:
        singular_values: ``(B, k)`` (or ``(k,)``) top singular values of each sample's Jacobian.
        energy: noise energy ``Σ τ_i`` to place per sample, in absolute units (> 0).
        v0: prior variance per input coordinate (1 for a prior-whitened spectrum).
        base: variance already present in every direction (e.g. the reference attacker precision).
        weights: ``(B, k)`` the pixel-error weight of each direction, ``w_i = ‖A v_i‖²`` for the spectrum of
            the prior-whitened ``J·A`` (THEORY §8.5): the allocation then maximises the attacker's pixel error
            ``Σ w_i (b+τ_i)/(b+τ_i+s̃_i²)``, not the whitened one. None: ``w_i = v0`` (the i.i.d. prior).
    """
    s = singular_values if singular_values.dim() == 2 else singular_values.unsqueeze(0)
    E = torch.as_tensor(energy, dtype=s.dtype, device=s.device).expand(s.shape[0])
    if not torch.isfinite(E).all() or (E < 0).any():
        raise ValueError(f"invdefend.allocation.water_filling: energy must be finite and >= 0, got {E.tolist()}")
    if v0 <= 0:
        raise ValueError(f"invdefend.allocation.water_filling: v0={v0} must be > 0")
    if not torch.isfinite(s).all():
        raise ValueError("invdefend.allocation.water_filling: singular values contain NaN/Inf")
    s64, E64 = s.double(), E.double()
    tiny = torch.finfo(torch.float64).tiny
    w64: Tensor | None = None
    if weights is not None:
        w = weights if weights.dim() == 2 else weights.unsqueeze(0)
        if w.shape != s.shape or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(
                f"invdefend.allocation.water_filling: weights must be finite, >= 0 and shaped like the singular "
                f"values {tuple(s.shape)}; got {tuple(w.shape)}"
            )
        w64 = w.double().clamp_min(tiny)
    base64 = torch.as_tensor(base, dtype=torch.float64, device=s.device)
    if base64.dim() == 1:
        base64 = base64.unsqueeze(-1)
    # Direction i starts receiving noise at the level c where s̃(c√w − s̃) = base: c = (s̃ + base/s̃)/√w;
    # above its onset it takes s̃√w per unit of level, so max onset + E/Σ s̃√w places at least E.
    if weights is None:  # the i.i.d. form, kept operation for operation (seeded releases stay bitwise the same)
        s_pos = s64.clamp_min(tiny)
        slope_sum = v0 * s_pos.sum(dim=-1)
        onset = s_pos + base64 / (v0 * s_pos)
    else:
        st = (math.sqrt(v0) * s64).clamp_min(tiny)
        slope_sum = (st * w64.sqrt()).sum(dim=-1)
        onset = (st + base64 / st) / w64.sqrt()
    # a direction with s = 0 (outside range(J), e.g. a dead ReLU path, or past the rank) carries nothing to
    # hide and never takes noise: its onset is infinite and stays out of the bracket
    live = s64 > 0 if w64 is None else (s64 > 0) & (w64 > tiny)
    any_live = live.any(dim=-1)
    lo = torch.where(any_live, onset.masked_fill(~live, math.inf).min(dim=-1).values, 0.0)
    hi = torch.where(any_live, onset.masked_fill(~live, -math.inf).max(dim=-1).values + E64 / slope_sum + 1e-12,
                     0.0)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        placed = water_filling_at_level(s64, mid, v0, base64, w64).sum(dim=-1)
        too_much = placed > E64
        hi = torch.where(too_much, mid, hi)
        lo = torch.where(too_much, lo, mid)
    tau = water_filling_at_level(s64, hi, v0, base64, w64)
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
    weights: Tensor | None = None,
    iterations: int = 60,
) -> tuple[Tensor, Tensor]:
    """The smallest water-filling allocation whose InvLoss reaches ``target_invloss``.

    Args:
        singular_values: ``(B, k)``.
        invloss_of: maps variances ``(B, k)`` on the held directions to InvLoss ``(B,)`` (tail included).
        target_invloss: InvLoss to reach per sample.
        max_energy: the largest energy allowed per sample; where even that misses the target, the
            allocation at ``max_energy`` is returned and ``reached`` is False for that sample.
        weights: the pixel-error weights of a prior-whitened spectrum (:func:`water_filling`).

    Returns:
        ``(tau, reached)``: variances ``(B, k)`` and a ``(B,)`` bool.
    """
    s = singular_values
    target = torch.as_tensor(target_invloss, dtype=torch.float64, device=s.device).expand(s.shape[0])
    cap = torch.as_tensor(max_energy, dtype=s.dtype, device=s.device).expand(s.shape[0])
    tau_cap = water_filling(s, cap, v0, base, weights=weights)
    reached = invloss_of(tau_cap).double() >= target
    lo = torch.zeros_like(cap, dtype=torch.float64)
    hi = cap.double().clone()
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        ok = invloss_of(water_filling(s, mid.to(s.dtype), v0, base, weights=weights)).double() >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    tau = water_filling(s, hi.to(s.dtype), v0, base, weights=weights)
    tau = torch.where(reached.unsqueeze(-1), tau, tau_cap)
    return tau, reached


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
    variances sum to ``energy`` ``(B,)`` (or a scalar). Placements (frontier study, ``docs/frontier_uniform_init.md``):

    * ``"weak25"`` (``fraction``): equal variance on the weakest ``fraction`` of the non-zero directions;
    * ``"band_pass"`` (``percentile``): ``τ_i ∝ s_i²/(s_i² + μ)²`` with ``μ`` the ``percentile``-th percentile
      of the non-zero ``s_i²`` — the law of :func:`band_pass_noise` along ``u_i``; or the given ``mu`` (a
      scalar or one per row), e.g. the one a :class:`~invdefend.defense.GradientDefense` draw used.
    """
    if singular_values.dim() != 2:
        raise ValueError(
            f"invdefend.allocation.placement_variances: singular_values must be (B, k), got {tuple(singular_values.shape)}"
        )
    if not 0.0 < fraction <= 1.0 or not 0.0 < percentile < 100.0:
        raise ValueError(
            f"invdefend.allocation.placement_variances: need 0 < fraction <= 1 and 0 < percentile < 100, got "
            f"fraction={fraction}, percentile={percentile}"
        )
    s = singular_values
    B = s.shape[0]
    e = torch.as_tensor(energy, dtype=s.dtype, device=s.device).expand(B) if not isinstance(energy, Tensor) or energy.dim() == 0 else energy.to(s.dtype)
    if e.shape != (B,) or bool((e < 0).any()):
        raise ValueError(
            f"invdefend.allocation.placement_variances: energy must be >= 0, a scalar or shaped ({B},), got {tuple(e.shape)}"
        )
    valid = s > 0
    if not bool(valid.any(dim=1).all()):
        raise ValueError("invdefend.allocation.placement_variances: a row has no non-zero singular value")
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
            f"invdefend.allocation.placement_variances: placement={placement!r}; choose 'weak25' or 'band_pass'"
        )
    return shape * (e / shape.sum(dim=1)).unsqueeze(1)
