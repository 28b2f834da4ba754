"""Target mode: the least budget of a placement that brings every probe's predicted PSNR down to a target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..cumulative import cumulative_invloss
from .base import NoisePlan, PlanContext, Placement

__all__ = ["Target"]


@dataclass(frozen=True, repr=False)
class Target(Placement):
    """Wraps a placement with a budget: per probe, the smallest relative budget in ``[0, max_budget]`` whose
    InvLoss (under the plan's own noise model, conservative top-k tail) reaches ``target_invloss``, found by
    bisection (``iterations`` halvings). A probe that even ``max_budget`` leaves short gets ``max_budget`` and
    the plan says ``target_reached=False``. With ``ctx.releases = T > 1`` the target is reached on the
    cumulative risk of ``T`` releases (the Jacobian held, THEORY §8.7: the release noise divided by ``T``), so
    the noise grows with the number of times the probes were released."""

    inner: Placement
    target_invloss: float
    max_budget: float
    iterations: int = 60

    def __post_init__(self) -> None:
        if not self.inner.supports_target:
            raise ValueError(f"invdefend.placements.Target: {self.inner.name!r} does not support target mode")

    @property
    def name(self) -> str:  # type: ignore[override]
        """The wrapped placement's name."""
        return self.inner.name

    @property
    def kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        """The wrapped placement's kinds."""
        return self.inner.kinds

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """The inner placement's plan at the least budget reaching the target, per probe."""
        P = ctx.spectrum.batch_size

        def reaches(budget: Tensor) -> tuple[NoisePlan, Tensor]:
            plan = self.inner.with_budget(budget).plan(ctx, prior)
            il = cumulative_invloss(ctx.spectrum, plan.noise_model(ctx.rho), ctx.releases, v0=ctx.v0, tail="topk")
            return plan, il.double() >= self.target_invloss

        cap = torch.full((P,), float(self.max_budget), dtype=torch.float64)
        _, reached = reaches(cap.to(ctx.dtype))
        lo, hi = torch.zeros_like(cap), cap.clone()
        for _ in range(self.iterations):
            mid = 0.5 * (lo + hi)
            _, ok = reaches(mid.to(ctx.dtype))
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        plan, _ = reaches(torch.where(reached, hi, cap).to(ctx.dtype))
        return NoisePlan(plan.shaped, plan.isotropic, bool(reached.all()), plan.operator_budget,
                         plan.operator_placement)

    def describe(self) -> dict[str, Any]:
        """The target and the wrapped placement."""
        return {"placement": self.name, "target_invloss": self.target_invloss, "max_budget": self.max_budget,
                "inner": self.inner.describe()}
