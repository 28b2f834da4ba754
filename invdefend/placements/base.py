"""The placement contract: plan noise from a spectrum, expose its law, compose.

A *placement* decides where a release's noise goes. It plans from the probes' spectrum and a
:class:`PlanContext`, and returns a :class:`NoisePlan`: the noise each probe sample effectively sees, as
variances along its left singular vectors (``shaped``) and per coordinate (``isotropic``), in absolute
units. Those variances are a Gaussian law, which the defense pipeline samples in its own release geometry
(one mean gradient, or one embedding per sample) and which InvRE prices. A placement whose noise is not a
Gaussian in a fixed basis (band-pass) also draws from the Jacobian operator at every release
(:meth:`Placement.draw_operator`) and states that its risk record leaves that part out.

Placements compose like optax transformations: :meth:`Placement.plan` receives the plan of the placements
before it (``prior``) and returns the cumulative plan, so a floor is ``Chain(Isotropic(floor), inner)``
(the inner placement sees the floor as noise already present) and target mode is the wrapper
:class:`~invdefend.placements.target.Target` (the least budget of the inner placement that reaches a risk
target). Register a new placement with :func:`~invdefend.placements.register`; see ``docs/architecture.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..jacobian import JacobianOperator
from ..noise import NoiseSource
from ..noise_law import NoiseCovariance, NoiseLaw
from ..risk import NoiseModel, reference_noise
from ..spectral import Spectrum

__all__ = ["PlanContext", "NoisePlan", "Placement"]


@dataclass(frozen=True)
class PlanContext:
    """What a placement plans from.

    Attributes:
        spectrum: the probe samples' spectrum (``P`` samples).
        scale: how noise on the release counts per sample: ``B²`` for a batch-``B`` mean gradient (the
            attacker who knows the rest of the batch sees the mean's noise ``B²`` times larger on one
            sample's gradient), ``1`` for an embedding.
        energy: the signal's energy ``‖ḡ‖²`` (a float, gradient) or ``‖h_p‖²`` per probe (``(P,)``, embedding);
            a relative budget ``b`` is the absolute per-sample energy ``scale·b·energy``.
        shares: how many probes share one shaped budget (``P`` when their noise is summed into one release,
            1 when each sample has its own).
        v0: prior variance per input coordinate.
        rho: the reference attacker precision.
        dtype: the dtype plans are computed in.
        releases: the releases the risk counts, this one included (target mode reaches its target on the
            cumulative risk over them, THEORY §8.7; 1: this release alone).
    """

    spectrum: Spectrum
    scale: float
    energy: float | Tensor
    shares: int
    v0: float
    rho: float
    dtype: torch.dtype = torch.float64
    releases: int = 1

    @property
    def singular_values(self) -> Tensor:
        """``(P, k)`` in :attr:`dtype`."""
        return self.spectrum.singular_values.to(self.dtype)

    @property
    def weights(self) -> Tensor | None:
        """``(P, k)`` the pixel-error weights ``‖A v_i‖²`` when the spectrum is prior-whitened (THEORY §8.5),
        else None (the i.i.d. prior: every direction weighs ``v0``)."""
        w = self.spectrum.prior_weights
        return None if w is None else w.to(self.dtype)

    @property
    def out_dim(self) -> int:
        """``m``, the shared quantity's size."""
        return self.spectrum.out_dim

    @property
    def reference(self) -> Tensor:
        """``τ_ref = (ρ·‖F(x)‖)²/m`` per probe ``(P,)`` (:func:`invdefend.risk.reference_noise`)."""
        return reference_noise(self.spectrum.signal_norm.to(self.dtype), self.out_dim, self.rho)

    def nothing(self) -> "NoisePlan":
        """The empty plan (no noise)."""
        P = self.spectrum.batch_size
        return NoisePlan(shaped=None, isotropic=torch.zeros(P, dtype=self.dtype))


@dataclass(frozen=True)
class NoisePlan:
    """The noise each probe sample effectively sees (absolute units, per sample).

    Attributes:
        shaped: ``(P, k)`` variances along each probe's left singular vectors, or None.
        isotropic: ``(P,)`` variance per coordinate.
        target_reached: target mode: whether every probe reached the target (None otherwise).
        operator_budget: energy, relative to the signal's, drawn from the Jacobian operator at every release
            and *not* included in ``shaped``/``isotropic`` (band-pass); 0 for a purely Gaussian plan.
        operator_placement: the placement that draws it (None when ``operator_budget`` is 0).
    """

    shaped: Tensor | None
    isotropic: Tensor
    target_reached: bool | None = None
    operator_budget: float = 0.0
    operator_placement: "Placement | None" = None

    @property
    def risk_noise_model(self) -> str:
        """What the risk record counts: ``"full"``, or ``"floor_only"`` when operator noise is left out (which
        over-states, never under-states, the leakage)."""
        return "floor_only" if self.operator_budget > 0 else "full"

    def noise_model(self, rho: float) -> NoiseModel:
        """The :class:`~invdefend.risk.NoiseModel` the risk record is evaluated under."""
        return NoiseModel(isotropic=self.isotropic, shaped=self.shaped, rho=rho)

    def add_isotropic(self, variance: Tensor) -> "NoisePlan":
        """This plan plus isotropic noise of ``variance`` per coordinate ``(P,)``."""
        return replace(self, isotropic=self.isotropic + variance)

    def add_shaped(self, variances: Tensor) -> "NoisePlan":
        """This plan plus shaped noise ``(P, k)`` along the probes' left singular vectors."""
        return replace(self, shaped=variances if self.shaped is None else self.shaped + variances)


class Placement(ABC):
    """One noise placement. Subclasses live in their own file and are registered by name.

    Class attributes:
        name: the registry name (set by :func:`~invdefend.placements.register`).
        kinds: the releases it supports (``"gradient"``, ``"embedding"``).
        adds_noise: False for a placement that only monitors.
        needs_spectrum: False when its noise can be released without a trusted spectrum (then a failed
            estimate loses only the risk record).
        supports_target: whether target mode (:class:`~invdefend.placements.target.Target`) may wrap it.
        default_floor_share: per release kind, the share of ``budget`` that goes into an isotropic floor when
            the settings leave ``floor=None`` (0: none); the rest is this placement's.
        default_shaped_cap: per release kind, the most energy (relative to the signal's) this placement takes
            when the settings leave ``floor=None``; what the share would give beyond it goes into the floor
            too, so ``budget`` stays the total (absent: no cap).
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("gradient", "embedding")
    adds_noise: ClassVar[bool] = True
    needs_spectrum: ClassVar[bool] = True
    supports_target: ClassVar[bool] = True
    default_floor_share: ClassVar[dict[str, float]] = {}
    default_shaped_cap: ClassVar[dict[str, float]] = {}

    @abstractmethod
    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """The cumulative plan: ``prior`` (the noise placed before this one; None: nothing) plus this
        placement's noise."""

    @classmethod
    def options_from(cls, settings: Any) -> dict[str, Any]:
        """The constructor options this placement takes from a defense's settings
        (:class:`~invdefend.defense.DefenseSettings`), besides ``budget``; none by default."""
        return {}

    def with_budget(self, budget: float | Tensor) -> "Placement":
        """The same placement at another relative budget (a float, or one per probe ``(P,)``), for target
        mode. Placements without a budget return themselves."""
        return self

    def draw_operator(self, op: JacobianOperator, source: NoiseSource) -> tuple[Tensor, dict[str, list[float]]]:
        """Noise drawn from the probes' Jacobian operator, ``(P, m)``, and its per-probe parameters (only for
        placements with ``operator_budget > 0`` in their plans)."""
        raise NotImplementedError(f"invdefend.placements: {self.name!r} draws no noise from the operator")

    def operator_law(self, params: dict[str, list[float]], *, budget: float, floor: float, signal_energy: float,
                     out_dim: int) -> NoiseLaw:
        """The public law of the operator noise drawn with ``params`` (only for operator placements)."""
        raise NotImplementedError(f"invdefend.placements: {self.name!r} draws no noise from the operator")

    def describe(self) -> dict[str, Any]:
        """The placement's settings, JSON-friendly."""
        return {"placement": self.name}

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "placement")
        return f"{type(self).__name__}({items})"


def gaussian_law(basis: Tensor | None, shaped: Tensor | None, isotropic: float) -> NoiseCovariance:
    """The :class:`~invdefend.noise_law.NoiseCovariance` of ``isotropic·I + Σ_j U_j diag(shaped_j) U_jᵀ``:
    ``basis`` ``(P, m, k)`` and ``shaped`` ``(P, k)`` (absolute variances), flattened into one ``(m, P·k)``
    basis (the probes' noise is summed into one release)."""
    if shaped is None or basis is None:
        return NoiseCovariance(sigma2_iso=isotropic)
    P, m, k = basis.shape
    return NoiseCovariance(sigma2_iso=isotropic, basis=basis.permute(1, 0, 2).reshape(m, P * k).double(),
                           tau=shaped.reshape(-1).double())
