"""No noise: the risk is still estimated and recorded (``mechanism="monitor"``)."""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import NoisePlan, PlanContext, Placement

__all__ = ["Monitor"]


@register("monitor")
@dataclass(frozen=True, repr=False)
class Monitor(Placement):
    """Adds nothing. A failed estimate is recorded and warned about; nothing is released under fallback noise,
    because no noise was asked for."""

    adds_noise = False
    supports_target = False

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """``prior`` unchanged (nothing when there is none)."""
        return prior if prior is not None else ctx.nothing()
