"""Isotropic noise: the same variance in every coordinate (the DP-SGD-like baseline, and the floor)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from . import register
from .base import NoisePlan, PlanContext, Placement

__all__ = ["Isotropic"]


@register("isotropic")
@dataclass(frozen=True, repr=False)
class Isotropic(Placement):
    """Energy ``budget`` (relative to the signal's) spread evenly over the ``m`` coordinates: per sample a
    variance ``scale·budget·energy/m`` per coordinate. It needs no spectrum to draw, but one to price it."""

    budget: float | Tensor = 0.05

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """``prior`` plus ``scale·budget·energy/m`` per coordinate."""
        prior = prior if prior is not None else ctx.nothing()
        variance = ctx.scale * self.budget * ctx.energy / ctx.out_dim
        return prior.add_isotropic(variance)

    def with_budget(self, budget: float | Tensor) -> "Isotropic":
        """This placement at another budget."""
        return replace(self, budget=budget)

    def describe(self) -> dict[str, Any]:
        """Name and budget."""
        return {"placement": self.name, "budget": self.budget}
