"""Pieces shared by the gradient and embedding defenses."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..jacobian import _check_dtypes, _check_inputs
from ..risk import default_prior_variance
from ..spectral import Spectrum

__all__ = [
    "MECHANISMS", "check_noise_settings",
    "DefenseError", "check_budget", "check_model", "check_batch", "target_invloss", "estimator_error",
    "spectrum_state", "spectrum_from_state",
]


class DefenseError(RuntimeError):
    """A release was refused: the defense could not protect it and released nothing."""


def check_model(owner: str, model: nn.Module) -> None:
    """Refuse, at construction, a model the estimators cannot assess (half precision)."""
    _check_dtypes(owner, model, None)


def check_batch(owner: str, inputs: Tensor) -> None:
    """Refuse a captured batch the estimator cannot assess (empty, not floating point, half precision,
    NaN/Inf) with a :class:`DefenseError`: such a batch would fail every estimate, so it is an error to fix,
    not a step to release under fallback noise."""
    try:
        _check_inputs(owner, inputs)
    except (TypeError, ValueError) as exc:
        raise DefenseError(f"{exc}; nothing was released") from exc


def check_budget(owner: str, name: str, value: float) -> None:
    """Raise a clear error unless ``value`` is a finite relative energy > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"invdefend.{owner}: {name}={value!r} must be a finite noise energy > 0 relative to the signal's "
            "(e.g. 0.05 for 5 %); to train without noise use mechanism='monitor'"
        )


MECHANISMS = ("spectral", "band_pass", "isotropic", "monitor")


def check_noise_settings(
    owner: str, mechanism: str, budget: float, max_budget: float, floor: float,
    mechanisms: tuple[str, ...] = MECHANISMS,
) -> None:
    """Validate the settings both defenses share: the mechanism (among ``mechanisms``, those ``owner``
    implements), the budgets and the isotropic floor."""
    if not isinstance(mechanism, str) or mechanism not in mechanisms:
        choices = ", ".join(repr(m) for m in mechanisms[:-1]) + f" or {mechanisms[-1]!r}"
        hint = ""
        if mechanism in MECHANISMS:
            hint = f" ({mechanism!r} is not available for {owner})"
        raise ValueError(f"invdefend.{owner}: mechanism={mechanism!r}{hint}; choose {choices}")
    if mechanism != "monitor":
        check_budget(owner, "budget", budget)
    check_budget(owner, "max_budget", max_budget)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
        raise ValueError(f"invdefend.{owner}: floor={floor!r} must be finite and >= 0 (0 disables it)")


def target_invloss(target_psnr: float, dynamic_range: float, v0: float | None = None) -> float:
    """The InvLoss that a target predicted PSNR corresponds to, checked against what is reachable.

    A release that teaches the attacker nothing has InvLoss ``v0``, i.e. predicted PSNR
    ``10·log10(R²/v0)``; targets at or above that are met without noise, targets below it need
    InvLoss > v0, which no noise reaches.
    """
    v0 = default_prior_variance(dynamic_range) if v0 is None else v0
    if not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr):
        raise ValueError(f"invdefend: target_psnr={target_psnr!r} must be a finite number of dB")
    floor_psnr = 10 * math.log10(dynamic_range**2 / v0)
    if target_psnr <= floor_psnr:
        raise ValueError(
            f"invdefend: target_psnr={target_psnr} dB is out of range: even a release that reveals nothing "
            f"has predicted PSNR {floor_psnr:.2f} dB (v0={v0:.4g}, R={dynamic_range}); choose a target above it"
        )
    return dynamic_range**2 / 10 ** (target_psnr / 10)


def estimator_error(spec: Spectrum) -> float:
    """The estimate's backward error: the largest Ritz residual ``‖JᵀJv_i − σ_i²v_i‖`` relative to ``σ₁²``.

    A value ``η`` means every held pair is an exact eigenpair of some ``JᵀJ + E`` with ``‖E‖ ≤ η·σ₁²``.
    Unlike the per-pair relative residual it does not blow up on a flat or clustered tail, where Ritz
    vectors mix freely among nearly equal values (harmless for the noise, which covers their span). 0 for
    an exact spectrum; NaN propagates (and counts as a failure).
    """
    if spec.residuals is None or spec.singular_values.numel() == 0:
        return 0.0
    s2 = spec.singular_values.double() ** 2
    top = s2[:, :1]
    err = spec.residuals.double() * s2 / top.clamp_min(torch.finfo(torch.float64).tiny)
    err = torch.where(top > 0, err, torch.zeros_like(err))
    return float(err.max())


def spectrum_state(spec: Spectrum | None) -> dict[str, Any] | None:
    """A checkpointable dict of a :class:`~invdefend.spectral.Spectrum` (tensors and plain values)."""
    if spec is None:
        return None
    return {
        "singular_values": spec.singular_values, "right_vectors": spec.right_vectors,
        "left_vectors": spec.left_vectors, "signal_norm": spec.signal_norm, "residuals": spec.residuals,
        "in_dim": spec.in_dim, "out_dim": spec.out_dim, "method": spec.method, "sweeps": spec.sweeps,
        "tol": spec.tol, "complete": spec.complete,
    }


def spectrum_from_state(state: dict[str, Any] | None) -> Spectrum | None:
    """Inverse of :func:`spectrum_state`."""
    if state is None:
        return None
    return Spectrum(
        singular_values=state["singular_values"], right_vectors=state["right_vectors"],
        left_vectors=state["left_vectors"], in_dim=int(state["in_dim"]), out_dim=int(state["out_dim"]),
        signal_norm=state["signal_norm"], method=state.get("method", "subspace"), sweeps=int(state["sweeps"]),
        residuals=state["residuals"], tol=float(state["tol"]), complete=bool(state.get("complete", False)),
    )
