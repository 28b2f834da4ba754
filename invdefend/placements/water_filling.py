"""Water-filling on the tracked top-k spectrum: the InvLoss-optimal allocation under the i.i.d. prior (THEORY §4),
and under a Gaussian data prior on the prior-whitened spectrum, weighted by each direction's pixel variance
(THEORY §8.5)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from torch import Tensor

from ..allocation import water_filling
from . import register
from .base import NoisePlan, PlanContext, Placement

__all__ = ["WaterFilling"]


@register("spectral")
@dataclass(frozen=True, repr=False)
class WaterFilling(Placement):
    """Per probe, energy ``scale·budget·energy/shares`` water-filled over its top-k left singular directions
    (:func:`invdefend.allocation.water_filling`), on top of the reference precision and any noise placed
    before it (``prior``, e.g. a floor). Registered as ``"spectral"``. Between refreshes the plan is reused,
    rescaled to the step's signal energy. When the defense prices with a data prior the spectrum is that of
    ``J·A`` and the allocation is weighted by ``w_i = ‖A v_i‖²``: ``τ_i = (s̃_i(c√w_i − s̃_i) − b)_+``, the
    attacker's pixel error maximised (THEORY §8.5).

    A defense-aware attacker whitens this placement away on the directions it leaves noise-free
    (``docs/frontier_uniform_init.md``): on gradients, half of the budget goes into an isotropic floor unless
    the settings give ``floor=`` (``docs/frontier.md``). That half is capped at ``1·‖ḡ‖²``: beyond it the
    shaped noise, concentrated on a few directions the model also learns along, cost accuracy on the demo's
    face CNN (−2.5 points at budget 20, −10.5 at 60) and bought no protection against an attacker with a face
    prior (``benchmarks/face_energy.py``); the rest of the budget goes into the floor. Budgets up to 2, where
    the frontier study measured its gain, are split as before."""

    default_floor_share: ClassVar[dict[str, float]] = {"gradient": 0.5}
    default_shaped_cap: ClassVar[dict[str, float]] = {"gradient": 1.0}

    budget: float | Tensor = 0.05
    iterations: int = 60

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """``prior`` plus the water-filling variances along the probes' top-k left singular vectors."""
        prior = prior if prior is not None else ctx.nothing()
        energy = ctx.scale * self.budget * ctx.energy / ctx.shares
        tau = water_filling(ctx.singular_values, energy, ctx.v0, ctx.reference + prior.isotropic,
                            weights=ctx.weights, iterations=self.iterations)
        return prior.add_shaped(tau)

    def with_budget(self, budget: float | Tensor) -> "WaterFilling":
        """This placement at another budget."""
        return replace(self, budget=budget)

    def describe(self) -> dict[str, Any]:
        """Name and budget."""
        return {"placement": self.name, "budget": self.budget}
