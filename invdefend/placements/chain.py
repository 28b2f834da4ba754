"""Placements applied one after the other, each seeing the noise the ones before it placed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ..jacobian import JacobianOperator
from ..noise import NoiseSource
from ..noise_law import NoiseLaw
from .base import NoisePlan, PlanContext, Placement

__all__ = ["Chain"]


@dataclass(frozen=True, repr=False)
class Chain(Placement):
    """``Chain(Isotropic(floor), WaterFilling(budget))`` plans the floor, then water-fills on top of it.

    Only the last placement's budget is changed by :meth:`with_budget` (target mode adjusts the placement
    being targeted, not the floor). At most one member may draw from the operator.
    """

    parts: tuple[Placement, ...] = ()

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("invdefend.placements.Chain: needs at least one placement")

    @property
    def name(self) -> str:  # type: ignore[override]
        """The last placement's name (the one the floor is chained before)."""
        return self.parts[-1].name

    @property
    def adds_noise(self) -> bool:  # type: ignore[override]
        """True if any member adds noise."""
        return any(p.adds_noise for p in self.parts)

    @property
    def needs_spectrum(self) -> bool:  # type: ignore[override]
        """Whether the last (principal) member needs a spectrum: the members before it are floors, which
        draw without one."""
        return self.parts[-1].needs_spectrum

    @property
    def kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        """The releases every member supports."""
        return tuple(k for k in ("gradient", "embedding") if all(k in p.kinds for p in self.parts))

    @property
    def supports_target(self) -> bool:  # type: ignore[override]
        """Whether the last member supports target mode."""
        return self.parts[-1].supports_target

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """Each member's plan on top of the previous ones'."""
        for part in self.parts:
            prior = part.plan(ctx, prior)
        assert prior is not None
        return prior

    def with_budget(self, budget: float | Tensor) -> "Chain":
        """The chain with the last member at another budget."""
        return replace(self, parts=(*self.parts[:-1], self.parts[-1].with_budget(budget)))

    def draw_operator(self, op: JacobianOperator, source: NoiseSource) -> tuple[Tensor, dict[str, list[float]]]:
        """The operator draw of the member that has one."""
        return self._operator_part().draw_operator(op, source)

    def operator_law(self, params: dict[str, list[float]], **kwargs: Any) -> NoiseLaw:
        """The operator law of the member that has one."""
        return self._operator_part().operator_law(params, **kwargs)

    def _operator_part(self) -> Placement:
        for part in self.parts:
            if type(part).draw_operator is not Placement.draw_operator:
                return part
        raise NotImplementedError("invdefend.placements.Chain: no member draws from the operator")

    def describe(self) -> dict[str, Any]:
        """The members' settings, in order."""
        return {"placement": self.name, "chain": [p.describe() for p in self.parts]}
