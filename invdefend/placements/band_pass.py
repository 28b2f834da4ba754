"""Band-pass noise: matrix-function noise deep in the range of each probe's Jacobian, redrawn every release.

``δ = J·g(JᵀJ)·w`` with ``g(λ) = 1/(λ + μ)`` and ``w ~ N(0, I_d)`` has variance ``s_i²·g(s_i²)²`` along ``u_i``
(THEORY §4): largest for ``s_i² ≈ μ``, small for directions far stronger or weaker, and none outside
range(J). It needs no SVD: ``g(JᵀJ)w`` is applied by Lanczos (:func:`invdefend.spectral.lanczos`). ``μ`` is
the ``quantile`` quantile of each probe's non-zero ``s_i²``, read off the same Lanczos run by quadrature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..jacobian import JacobianOperator
from ..noise import NoiseSource
from ..noise_law import BandPassLaw, NoiseLaw
from ..spectral import lanczos
from . import register
from .base import NoisePlan, PlanContext, Placement

__all__ = ["BandPass", "band_pass_noise"]


@register("band_pass")
@dataclass(frozen=True, repr=False)
class BandPass(Placement):
    """At every release, ``probes`` samples of the current batch each get ``J(JᵀJ + μ)⁻¹w`` noise; the pipeline
    rescales their sum to energy exactly ``budget·‖ḡ‖²``. Gradients only.

    Its risk record is conservative: the plan leaves the band-pass noise out (``risk_noise_model ==
    "floor_only"``), so it counts only what is chained before it (the floor) and the reference precision.
    A failed top-k estimate loses the risk record, not the noise (``needs_spectrum = False``). Target mode
    is not available: no budget can be shown to reach a target by a record that ignores the noise.
    Cost: ``probes × steps`` Jacobian-vector/vector-Jacobian product pairs at every release.
    """

    kinds = ("gradient",)
    needs_spectrum = False
    supports_target = False

    budget: float = 0.05
    steps: int = 24
    quantile: float = 0.25

    def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
        """``prior`` with ``budget`` of operator noise to draw at every release (not in the Gaussian part)."""
        prior = prior if prior is not None else ctx.nothing()
        return replace(prior, operator_budget=prior.operator_budget + self.budget, operator_placement=self)

    @classmethod
    def options_from(cls, settings: Any) -> dict[str, Any]:
        """``steps`` and ``quantile`` from ``band_pass_steps`` and ``band_pass_quantile``."""
        return {"steps": int(settings.band_pass_steps), "quantile": float(settings.band_pass_quantile)}

    def with_budget(self, budget: float | Tensor) -> "BandPass":
        """This placement at another budget."""
        return replace(self, budget=float(budget))

    def draw_operator(self, op: JacobianOperator, source: NoiseSource) -> tuple[Tensor, dict[str, list[float]]]:
        """``(P, m)`` band-pass noise (unit scale) and ``{"band_pass_mu": [μ_j]}``."""
        delta, mu = band_pass_noise(op, None, 1.0, source, steps=self.steps, mu_quantile=self.quantile,
                                    return_mu=True)
        return delta, {"band_pass_mu": [float(v) for v in mu]}

    def operator_law(self, params: dict[str, list[float]], *, budget: float, floor: float, signal_energy: float,
                     out_dim: int) -> NoiseLaw:
        """The :class:`~invdefend.noise_law.BandPassLaw` of a draw with these ``μ``."""
        return BandPassLaw(mu=torch.tensor(params["band_pass_mu"], dtype=torch.float64), budget=budget,
                           floor=floor, signal_energy=signal_energy, out_dim=out_dim)

    def describe(self) -> dict[str, Any]:
        """Name, budget, Lanczos steps and the quantile of μ."""
        return {"placement": self.name, "budget": self.budget, "steps": self.steps, "quantile": self.quantile}


def band_pass_noise(
    op: JacobianOperator,
    mu: Tensor | float | None,
    scale: Tensor | float,
    source: NoiseSource,
    *,
    steps: int = 24,
    mu_quantile: float = 0.25,
    return_mu: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Matrix-function noise ``δ = scale · J·g(JᵀJ)·w`` with ``g(λ) = 1/(λ + μ)`` and ``w ~ N(0, I_d)``.

    Its variance along ``u_i`` is ``scale²·s_i²·g(s_i²)²`` (THEORY §4): largest for ``s_i² ≈ μ``, small for
    directions far stronger or weaker. ``g(JᵀJ)w`` is applied by Lanczos on ``JᵀJ`` (``steps`` products) with
    no SVD. Returns ``(B, m)``.

    Args:
        mu: ``μ`` (a scalar or one per sample, ``(B,)``); ``None`` to choose it per sample as the
            ``mu_quantile`` quantile of the non-zero eigenvalues of ``JᵀJ`` (the squared singular values
            ``s_i²``), estimated at no extra cost from the same Lanczos run by stochastic Lanczos quadrature:
            the spectral measure is approximated by the Ritz values ``θ_j`` of the tridiagonal ``T`` with
            weights ``Y[0, j]²`` (one random start vector, so the estimate is a noisy one: with ``steps = d``
            the ``θ_j`` are exact eigenvalues but their weights are ``(u_jᵀw)²/‖w‖²``, not ``1/d``). Ritz
            values ``≤ 1e-10·θ_max`` count as zero and are left out (weights renormalised); the quantile is the
            smallest ``θ_j`` whose cumulative weight reaches ``mu_quantile``. A sample whose Jacobian is zero
            gets ``μ = 1`` (its noise is zero whatever ``μ``).
        mu_quantile: in ``(0, 1)``; used only when ``mu`` is None.
        return_mu: also return the ``μ`` used, ``(B,)`` float64.
    """
    if isinstance(mu_quantile, bool) or not isinstance(mu_quantile, (int, float)) or not 0.0 < mu_quantile < 1.0:
        raise ValueError(
            f"invdefend.placements.band_pass.band_pass_noise: mu_quantile={mu_quantile!r} must be a number in (0, 1) "
            "(e.g. 0.25 for the 25th percentile of the non-zero s²)"
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"invdefend.placements.band_pass.band_pass_noise: steps={steps!r} must be an integer >= 1")
    steps = int(steps)
    B, d = op.batch_size, op.in_dim
    w = source.normal((B, d, 1), op.dtype, op.device)
    Q, T, wnorm = lanczos(lambda q: op.rmatvec(op.matvec(q)), w, min(steps, d), stop_on_breakdown=True)
    Q, T, wnorm = Q[:, 0], T[:, 0], wnorm[:, :1].unsqueeze(-1)  # one start vector per sample
    theta, Y = torch.linalg.eigh(T)
    if mu is None:
        mu_t = _quadrature_quantile(theta, Y[:, 0, :].pow(2), float(mu_quantile)).reshape(-1, 1)
    else:
        mu_t = torch.as_tensor(mu, dtype=torch.float64, device=theta.device).reshape(-1, 1)
    coeff = Y @ ((Y[:, 0, :] / (theta.clamp_min(0) + mu_t)).unsqueeze(-1))  # g(T) e1
    gw = Q @ coeff.to(op.dtype) * wnorm
    delta = op.matvec(gw).squeeze(-1)
    delta = delta * torch.as_tensor(scale, dtype=op.dtype, device=op.device).reshape(-1, 1)
    if return_mu:
        return delta, mu_t.reshape(-1).expand(B).clone()
    return delta


def _quadrature_quantile(theta: Tensor, weights: Tensor, q: float) -> Tensor:
    """Per row, the ``q`` quantile of the discrete measure ``Σ_j weights_j δ(θ_j)`` restricted to its
    non-zero support (``θ > 1e-10·θ_max``, weights renormalised): the smallest ``θ_j`` whose cumulative
    weight reaches ``q``. Rows without a non-zero ``θ`` get 1. ``theta``, ``weights``: ``(B, n)``; returns
    ``(B,)`` float64."""
    theta, weights = theta.double(), weights.double()
    top = theta.max(dim=-1, keepdim=True).values
    keep = (theta > 1e-10 * top) & (theta > 0)
    w = torch.where(keep, weights, torch.zeros_like(weights))
    order = theta.argsort(dim=-1)
    th_sorted, w_sorted = theta.gather(-1, order), w.gather(-1, order)
    total = w_sorted.sum(dim=-1, keepdim=True)
    cdf = w_sorted.cumsum(dim=-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # First kept index whose cumulative weight reaches q (a tiny slack for rounding).
    reached = (cdf >= q - 1e-12) & keep.gather(-1, order)
    first = reached.to(torch.int8).argmax(dim=-1)  # 0 where nothing is reached (then replaced below)
    mu = th_sorted.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    ok = reached.any(dim=-1) & (total.squeeze(-1) > 0) & torch.isfinite(mu) & (mu > 0)
    return torch.where(ok, mu, torch.ones_like(mu))
