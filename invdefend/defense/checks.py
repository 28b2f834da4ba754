"""What both defenses refuse before they release anything, and the error they refuse with."""

from __future__ import annotations

from torch import Tensor, nn

from ..jacobian import check_dtypes, check_inputs
from ..placements import Placement

__all__ = ["DefenseError", "check_model", "check_batch", "check_placement"]


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
