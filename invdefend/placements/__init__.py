"""Noise placements, one class per file, registered by name.

A placement plans where a release's noise goes (:class:`~invdefend.placements.base.Placement`); the
defenses look it up here by the name their ``mechanism`` setting gives::

    @register("my_placement")
    @dataclass(frozen=True, repr=False)
    class MyPlacement(Placement):
        budget: float = 0.05
        def plan(self, ctx, prior=None): ...

    GradientDefense(model, loss, mechanism="my_placement")

:func:`compose` builds the placement a defense runs from its settings: the named placement, wrapped in
:class:`~invdefend.placements.target.Target` in target mode and chained after an isotropic floor
(:class:`~invdefend.placements.chain.Chain`) when one is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "register", "unregister", "get_placement", "available", "compose",
    "Placement", "PlanContext", "NoisePlan", "Chain", "Target", "Isotropic", "WaterFilling", "BandPass", "Monitor",
]

_REGISTRY: dict[str, type] = {}
P = TypeVar("P", bound=type)


def register(name: str) -> Callable[[P], P]:
    """Class decorator: register a :class:`Placement` subclass under ``name`` (and set its ``name``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invdefend.placements.register: name={name!r} must be a non-empty string")

    def decorate(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"invdefend.placements.register: {name!r} is already registered to {_REGISTRY[name].__name__}; "
                "choose another name"
            )
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove the placement registered as ``name`` by :func:`register` (a plugin's or a test's). The library's
    own placements cannot be removed: other parts of the library name them."""
    if name not in _REGISTRY:
        raise ValueError(f"invdefend.placements.unregister: {name!r} is not registered; registered: {available()}")
    if _REGISTRY[name].__module__.startswith(__name__ + "."):
        raise ValueError(f"invdefend.placements.unregister: {name!r} is one of the library's own placements")
    del _REGISTRY[name]


def available(kind: str | None = None) -> tuple[str, ...]:
    """The registered names (those supporting ``kind``, ``"gradient"`` or ``"embedding"``, when given)."""
    return tuple(n for n, cls in _REGISTRY.items() if kind is None or kind in cls.kinds)


def get_placement(name: str, kind: str | None = None, owner: str = "placements") -> type:
    """The placement class registered as ``name``; a clear error naming the choices otherwise."""
    names = available(kind)
    if isinstance(name, str) and name in names:
        return _REGISTRY[name]
    hint = f" ({name!r} is not available for {owner})" if isinstance(name, str) and name in _REGISTRY else ""
    choices = ", ".join(repr(m) for m in names[:-1]) + f" or {names[-1]!r}"
    raise ValueError(f"invdefend.{owner}: mechanism={name!r}{hint}; choose {choices}")


def compose(
    name: str,
    *,
    kind: str,
    budget: float,
    floor: float = 0.0,
    target_invloss: float | None = None,
    max_budget: float = 1.0,
    options: dict[str, Any] | None = None,
    owner: str = "placements",
) -> "Placement":
    """The placement a defense runs: ``name`` at ``budget`` (with ``options``), in :class:`Target` when
    ``target_invloss`` is set, after an :class:`Isotropic` floor when ``floor > 0``."""
    cls = get_placement(name, kind, owner)
    placement = cls(budget=budget, **(options or {})) if "budget" in getattr(cls, "__dataclass_fields__", {}) \
        else cls(**(options or {}))
    if target_invloss is not None and placement.adds_noise:
        placement = Target(placement, target_invloss, max_budget)
    if floor > 0 and placement.adds_noise:
        placement = Chain((Isotropic(budget=floor), placement))
    return placement


from .base import NoisePlan, Placement, PlanContext  # noqa: E402
from .chain import Chain  # noqa: E402
from .target import Target  # noqa: E402
from .water_filling import WaterFilling  # noqa: E402  (registration order = the order errors list them)
from .band_pass import BandPass  # noqa: E402
from .isotropic import Isotropic  # noqa: E402
from .monitor import Monitor  # noqa: E402
