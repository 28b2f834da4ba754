"""What both defenses refuse before they release anything, and the error they refuse with."""

from __future__ import annotations

from torch import Tensor, nn

from ..jacobian import check_dtypes, check_inputs

__all__ = ["DefenseError", "check_model", "check_batch"]


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
