"""Where a defense's data prior comes from: none (the i.i.d. ``v0·I``), a fitted one, or one tracked online.

With a prior the defense estimates the spectrum of the prior-whitened Jacobian ``J·A``
(:class:`~invdefend.whitened.WhitenedOperator`): the placement then plans in whitened coordinates (its
water-filling uses ``v0 = 1`` there) and the record prices the release in pixels under the prior
(:mod:`invdefend.risk`). An online prior is fitted on the batches the defense has *already* released, never on
the batch it prices; until it has ``min_samples`` samples the defense prices with ``v0·I``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..prior import GaussianPrior, OnlinePrior

__all__ = ["PriorSource", "prior_source"]


class PriorSource:
    """The defense's current prior (:meth:`current`), fed with every released batch (:meth:`observe`)."""

    def __init__(self, prior: GaussianPrior | OnlinePrior | None) -> None:
        self.fixed = prior if isinstance(prior, GaussianPrior) else None
        self.online = prior if isinstance(prior, OnlinePrior) else None

    def current(self) -> GaussianPrior | None:
        """The prior to price the next release with, or ``None`` for ``v0·I``."""
        if self.fixed is not None:
            return self.fixed
        return None if self.online is None else self.online.prior()

    def observe(self, inputs: Tensor) -> None:
        """A batch was released: an online prior learns from it (after it was priced)."""
        if self.online is not None:
            self.online.update(inputs)

    @property
    def label(self) -> str:
        """``"iid"``, ``"data"`` or ``"online"`` (``"online (iid until N samples)"`` while waiting)."""
        if self.fixed is not None:
            return "data"
        if self.online is None:
            return "iid"
        return "online" if self.online.prior() is not None else f"online (iid until {self.online.min_samples} samples)"


def prior_source(owner: str, prior: Any) -> PriorSource:
    """Check the ``prior`` setting (None, ``"online"``, a :class:`GaussianPrior` or an :class:`OnlinePrior`)."""
    if prior is None or isinstance(prior, (GaussianPrior, OnlinePrior)):
        return PriorSource(prior)
    if prior == "online":
        return PriorSource(OnlinePrior())
    raise ValueError(
        f"invdefend.{owner}: prior={prior!r}; pass None (i.i.d. v0·I), 'online' (fitted on the batches already "
        "released), a GaussianPrior (e.g. GaussianPrior.fit(calibration_inputs)) or an OnlinePrior"
    )
