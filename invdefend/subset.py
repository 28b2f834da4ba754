"""A layer subset: the risk from the spectrum of chosen parameters' gradient, with the others' leakage bounded.

The attacker sees the gradient of every parameter, so the spectrum of a subset ``S`` alone under-states the
risk. With ``J = [J_S; J_R]`` (rows of ``S`` and of the rest ``R``) and noise that is block-diagonal between
them (isotropic noise is), the information is ``J_SᵀΣ_S⁻¹J_S + J_RᵀΣ_R⁻¹J_R``, and with ``σ²`` the noise on
``R`` the second term is at most ``(s_R²/σ²)·I``, ``s_R = ‖J_R‖₂``. InvLoss decreases in the Loewner order of
the information, so

    InvLoss(full) ≥ (1/d) · tr((I/v0 + J_SᵀΣ_S⁻¹J_S + (s_R²/σ²)·I)⁻¹):

the subset's InvLoss with the prior variance ``v0`` replaced by ``1/(1/v0 + s_R²/σ²)`` in every direction. A
lower bound on InvLoss is an upper bound on predicted PSNR, i.e. conservative (THEORY §10.6). With a data
prior the same holds in whitened coordinates with ``s_R = ‖J_R·A‖₂``.

``s_R`` must be over-estimated: :func:`rest_norm` runs Lanczos on ``J_RᵀJ_R`` from a random start and
inflates its largest Ritz value by the Kuczyński–Woźniakowski (1992) bound, so the result is an upper bound on
``‖J_R‖₂`` except with probability at most ``failure`` per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .jacobian import (
    ParamSpec,
    gradient_jacobian,
    select_parameters,
    trainable_parameters,
)
from .prior import GaussianPrior
from .risk import NoiseModel, RiskEstimate, Tail, invloss, reference_noise
from .spectral import Spectrum, lanczos
from .whitened import WhitenedOperator

__all__ = [
    "DEFAULT_FAILURE", "DEFAULT_STEPS", "ROUNDING", "RestBound", "bounded_invloss", "bounded_risk", "lanczos_factor",
    "rest_norm", "rest_parameters",
]

#: Lanczos steps (products with ``J_RᵀJ_R``) of :func:`rest_norm`.
DEFAULT_STEPS: int = 20
#: Probability per sample that :func:`rest_norm`'s estimate falls below ``‖J_R‖₂``.
DEFAULT_FAILURE: float = 1e-3
#: Relative allowance for rounding in the products (float32): the Ritz value of exact arithmetic is what the
#: probabilistic bound is about.
ROUNDING: float = 1e-4


@dataclass(frozen=True)
class RestBound:
    """What the parameters outside a layer subset can add, per sample.

    Attributes:
        norm: ``(B,)`` upper estimate of ``‖J_R‖₂`` (of ``‖J_R·A‖₂`` with a data prior).
        ritz: ``(B,)`` the largest Lanczos Ritz value's root, a lower bound on the same norm.
        signal_norm: ``(B,)`` ``‖F_R(x)‖``, the rest's gradient (for the reference precision of the whole).
        out_dim: ``m_R``, the number of rest parameters (0 when the subset holds them all).
        factor: ``norm / ritz``, the inflation (:func:`lanczos_factor`).
        steps, failure: the Lanczos steps taken and the failure probability per sample.
        whitened: True when taken in the whitened coordinates of a data prior.
    """

    norm: Tensor
    ritz: Tensor
    signal_norm: Tensor
    out_dim: int
    factor: float
    steps: int
    failure: float
    whitened: bool = False


def rest_parameters(model: nn.Module, params: ParamSpec) -> list[str]:
    """The trainable parameters outside the subset ``params`` (:func:`~invdefend.jacobian.select_parameters`)."""
    chosen = set(select_parameters(model, params))
    return [name for name in trainable_parameters(model) if name not in chosen]


def lanczos_factor(dim: int, steps: int, failure: float = DEFAULT_FAILURE) -> float:
    """``1/√(1−ε)``: what the root of the largest Ritz value of ``steps`` Lanczos steps from a uniformly random
    start on a ``dim × dim`` positive semidefinite matrix is multiplied by to bound its largest singular value,
    except with probability ``failure``. Kuczyński & Woźniakowski (1992): the relative error of the Ritz value
    is ``≥ ε`` with probability at most ``1.648·√dim·exp(−√ε·(2·steps − 1))``, so
    ``ε = (ln(1.648·√dim/failure) / (2·steps − 1))²``; ``ε = 0`` once the Krylov space can be the whole space
    (``steps ≥ dim``). Times ``1 +`` :data:`ROUNDING`."""
    if not 0 < failure < 1:
        raise ValueError(f"invdefend.subset: failure={failure} must be in (0, 1)")
    if steps < 2:
        raise ValueError(f"invdefend.subset: steps={steps} must be >= 2")
    eps = 0.0 if steps >= dim else (math.log(1.648 * math.sqrt(dim) / failure) / (2 * steps - 1)) ** 2
    if eps >= 1:
        least = math.ceil((math.log(1.648 * math.sqrt(dim) / failure) + 1) / 2)
        raise ValueError(f"invdefend.subset: {steps} Lanczos steps bound nothing at failure={failure} on {dim} "
                         f"input coordinates; use at least {least} steps (or a larger failure probability)")
    return (1.0 + ROUNDING) / math.sqrt(1.0 - eps)


def rest_norm(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    params: ParamSpec,
    *,
    steps: int = DEFAULT_STEPS,
    failure: float = DEFAULT_FAILURE,
    mode: Literal["eval", "train"] = "eval",
    prior: GaussianPrior | None = None,
    generator: torch.Generator | None = None,
) -> RestBound:
    """Per-sample upper estimates of ``‖J_R‖₂``, the Jacobian of the gradient of the parameters NOT in
    ``params`` (of ``J_R·A`` with a data ``prior``): ``steps`` Lanczos steps on ``J_RᵀJ_R`` from a Gaussian
    start, the largest Ritz value inflated by :func:`lanczos_factor` (an upper bound except with probability
    ``failure`` per sample). Costs ``steps`` products with ``J_RᵀJ_R`` of one column, and one gradient."""
    rest = rest_parameters(model, params)
    B = int(inputs.shape[0])
    if not rest:  # the subset is the whole model: nothing to bound
        zeros = torch.zeros(B, dtype=torch.float64)
        return RestBound(zeros, zeros, zeros, 0, 1.0, 0, failure, prior is not None)
    op = gradient_jacobian(model, loss_fn, inputs, targets, mode=mode, params=rest)
    gram = WhitenedOperator(op, prior) if prior is not None else op
    steps = min(steps, op.in_dim)
    factor = lanczos_factor(op.in_dim, steps, failure)
    gen = generator if generator is not None else torch.Generator(device=op.device).manual_seed(0)
    start = torch.randn(B, op.in_dim, 1, generator=gen, device=op.device, dtype=op.dtype)
    _, T, _ = lanczos(gram.gram_matvec, start, steps, stop_on_breakdown=True)
    top = torch.linalg.eigvalsh(T)[:, 0, -1].clamp_min(0.0)  # (B,) largest Ritz value, float64
    ritz = top.sqrt()
    return RestBound(norm=ritz * factor, ritz=ritz, signal_norm=op.values().norm(dim=-1).double(),
                     out_dim=op.out_dim, factor=factor, steps=steps, failure=failure, whitened=prior is not None)


def _whole_noise(spectrum: Spectrum, rest: RestBound, noise: NoiseModel) -> tuple[NoiseModel, Tensor]:
    """The release's noise on the whole gradient as absolute variances (the reference precision of the WHOLE
    gradient, ``(ρ·‖F‖)²/m`` with ``‖F‖² = ‖F_S‖² + ‖F_R‖²``, ``m = m_S + m_R``, folded into the isotropic
    part), and the information ``s_R²/σ²`` the rest adds at most per direction, ``σ²`` its variance per
    coordinate."""
    s = spectrum.singular_values
    whole = (spectrum.signal_norm.double() ** 2 + rest.signal_norm.double().to(s.device) ** 2).sqrt()
    ref = reference_noise(whole, spectrum.out_dim + rest.out_dim, noise.rho)
    base = ref + torch.as_tensor(noise.isotropic, dtype=torch.float64, device=s.device).expand(s.shape[0])
    norm2 = rest.norm.double().to(s.device) ** 2
    info = torch.where(norm2 > 0, norm2 / base, torch.zeros_like(norm2))  # base 0 and s_R > 0: infinite
    return NoiseModel(isotropic=base.to(s), shaped=noise.shaped, rho=0.0), info.to(s)


def _check(spectrum: Spectrum, rest: RestBound) -> None:
    if rest.norm.shape != (spectrum.batch_size,):
        raise ValueError(f"invdefend.subset: the rest bound holds {tuple(rest.norm.shape)} samples but the "
                         f"spectrum {spectrum.batch_size}; take both on the same batch")
    if rest.whitened != spectrum.whitened:
        raise ValueError("invdefend.subset: the spectrum and the rest bound must both be taken with the data "
                         "prior or both without (rest_norm(..., prior=...) for a prior-whitened spectrum)")


def bounded_invloss(
    spectrum: Spectrum,
    rest: RestBound,
    noise: NoiseModel | None = None,
    *,
    v0: float | None = None,
    tail: Tail = "auto",
) -> Tensor:
    """A per-sample lower bound ``(B,)`` on the InvLoss of the WHOLE gradient from the spectrum of a subset's
    (``gradient_jacobian(..., params=...)``) and the bound on the rest (:func:`rest_norm`): the subset's InvLoss
    with ``s_R²/σ²`` added to every direction's precision (THEORY §10.6). ``noise`` is the release's on the
    whole gradient: isotropic, plus optional shaped variances along the subset spectrum's directions (noise
    confined to the subset's coordinates, so block-diagonal); the reference precision ``ρ`` is that of the
    whole gradient. Exact-spectrum and top-k tails keep it a bound; the SLQ tail is an estimate of it."""
    _check(spectrum, rest)
    whole, info = _whole_noise(spectrum, rest, noise or NoiseModel())
    return invloss(spectrum, whole, v0=v0, tail=tail, extra_information=info)


def bounded_risk(
    spectrum: Spectrum,
    rest: RestBound,
    noise: NoiseModel | None = None,
    *,
    v0: float | None = None,
    dynamic_range: float = 1.0,
    tail: Tail = "auto",
) -> RiskEstimate:
    """:class:`~invdefend.risk.RiskEstimate` of :func:`bounded_invloss` (predicted PSNR an upper bound on the
    whole gradient's, leakage relative to the prior's variance)."""
    _check(spectrum, rest)
    whole, info = _whole_noise(spectrum, rest, noise or NoiseModel())
    return RiskEstimate.from_spectrum(spectrum, whole, v0=v0, dynamic_range=dynamic_range, tail=tail,
                                      extra_information=info)
