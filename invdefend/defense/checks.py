"""What both defenses share around a release: what they refuse before releasing anything (and the error they
refuse with), and the risk fields their records carry."""

from __future__ import annotations

from torch import Tensor, nn

from typing import Any

from ..cumulative import cumulative_invloss
from ..jacobian import check_dtypes, check_inputs
from ..placements import NoisePlan, Placement
from ..risk import NoiseModel, invloss, leakage, predicted_psnr, prior_mean_variance
from ..spectral import Spectrum, estimator_error

__all__ = ["DefenseError", "check_model", "check_batch", "check_placement", "risk_fields"]


class DefenseError(RuntimeError):
    """A release was refused: the defense could not protect it and released nothing."""


def check_model(owner: str, model: nn.Module) -> None:
    """Refuse, at construction, a model the estimators cannot assess (half precision)."""
    check_dtypes(owner, model, None)


def check_batch(owner: str, inputs: Tensor) -> None:
    """Refuse a captured batch the estimator cannot assess (empty, not floating point, half precision,
    NaN/Inf) with a :class:`DefenseError`: such a batch would fail every estimate, so it is an error to fix,
    not a step to release under fallback noise."""
    try:
        check_inputs(owner, inputs)
    except (TypeError, ValueError) as exc:
        raise DefenseError(f"{exc}; nothing was released") from exc


def check_placement(owner: str, placement: Placement, kind: str) -> None:
    """Refuse a placement that is not a :class:`~invdefend.placements.Placement` or does not support ``kind``."""
    if not isinstance(placement, Placement):
        raise TypeError(f"invdefend.{owner}: placement must be an invdefend.placements.Placement, got "
                        f"{type(placement).__name__}")
    if kind not in placement.kinds:
        raise ValueError(f"invdefend.{owner}: the {placement.name!r} placement supports {', '.join(placement.kinds)} "
                         f"releases, not {kind}; choose one of invdefend.placements.available({kind!r})")


def risk_fields(
    spec: Spectrum, plan: NoisePlan, *, rho: float, v0: float, dynamic_range: float, releases: int = 0
) -> dict[str, Any]:
    """The risk a release record carries: predicted PSNR and leakage under the plan's noise model, the
    undefended prediction, the spectrum and the estimator's health (conservative top-k tail); with
    ``releases`` (the most releases any sample of the batch took part in, ≥ 1) also the cumulative
    prediction over them (:func:`invdefend.cumulative.cumulative_invloss`: the Jacobian held at its current
    value, a lower bound on the cumulative risk of a moving model)."""
    noisy = invloss(spec, plan.noise_model(rho), v0=v0, tail="topk")
    clean = invloss(spec, NoiseModel(rho=rho), v0=v0, tail="topk")
    nothing = prior_mean_variance(spec)  # a prior-whitened spectrum: leakage relative to the data prior
    out = dict(
        predicted_psnr=predicted_psnr(noisy, dynamic_range).tolist(),
        leakage=leakage(noisy, v0 if nothing is None else nothing).tolist(),
        undefended_predicted_psnr=predicted_psnr(clean, dynamic_range).tolist(),
        singular_values=spec.singular_values.reshape(-1).double().tolist(),
        sweeps=spec.sweeps,
        max_residual=estimator_error(spec),
        estimator_start=spec.extra.get("start", ""),
    )
    if releases >= 1:
        cum = cumulative_invloss(spec, plan.noise_model(rho), releases, v0=v0, tail="topk")
        out["cumulative_predicted_psnr"] = predicted_psnr(cum, dynamic_range).tolist()
    return out
