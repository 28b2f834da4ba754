"""InvLoss — the best achievable reconstruction error — from a spectrum and a noise model.

For a release ``s̃ = F(x) + ε`` with ``ε ~ N(0, Σ)``, a Gaussian prior ``N(μ, v0·I)`` on ``x`` and ``F``
linearised at ``x`` (``J = U diag(s) Vᵀ``), the Bayes attacker's mean squared error per coordinate is

    InvLoss(x) = (1/d) · Σ_{i=1..d} 1 / (s_i²/τ_i + 1/v0),      s_i = 0 beyond rank(J),

when ``Σ`` has variance ``τ_i`` along ``u_i``. The noise model here is the sum of three parts, all
variances along the left singular directions:

* the reference attacker precision ``τ_ref = (ρ·‖F(x)‖)² / m`` in every direction (always present;
  ``ρ`` is frozen at :data:`DEFAULT_RHO` after calibration on attack runs, see ``benchmarks/fidelity_digits.py``);
* isotropic noise ``τ_iso`` in every direction;
* shaped noise ``τ_shaped[i]`` along each of the spectrum's top-k ``u_i``.

The directions the spectrum does not hold (the *tail*) are handled in one of two documented ways:
``"slq"`` evaluates the stochastic Lanczos quadrature rule stored in the spectrum; ``"topk"`` treats
every unestimated direction up to ``min(m, d)`` as if it had ``s_k`` (the largest value it could have), which
under-states InvLoss, i.e. over-states risk. Directions beyond ``min(m, d)`` are in the null space
and contribute ``v0`` each.

**With a data prior** ``N(μ, C)`` (THEORY §7) the spectrum is that of the prior-whitened ``J̃ = J·A``
(``A·Aᵀ = C``; :func:`invdefend.spectral.estimate_spectrum` with ``prior=``) and carries the weights
``w_i = ‖A v_i‖²``. The Bayes error in pixels is ``tr(A (I + J̃ᵀΣ⁻¹J̃)⁻¹ Aᵀ)``, i.e.

    InvLoss(x) = (1/d) · [ Σ_i w_i · τ_i/(τ_i + s̃_i²)  +  (tail) ],

each whitened direction contributing its share of the prior variance that the release leaves. The tail:
``"slq"`` evaluates the quadrature rule built with probes of covariance ``AᵀA`` (so it already carries the
weights); for an exact (complete) spectrum the prior variance ``tr C − Σ w_i`` the held directions do not
carry lies in the null space of ``J̃`` and is left whole; ``"topk"`` treats all of it as if it sat at
``s̃_k`` (over-states risk). ``v0·I`` is the special case ``C = v0·I`` (then ``w_i = v0``, ``s̃ = √v0·s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .spectral import Spectrum

if TYPE_CHECKING:
    from .prior import GaussianPrior

__all__ = [
    "DEFAULT_RHO",
    "NoiseModel",
    "RiskEstimate",
    "invloss",
    "invloss_from_values",
    "invloss_by_group",
    "predicted_psnr",
    "leakage",
    "reference_noise",
    "default_prior_variance",
    "target_invloss",
    "prior_mean_variance",
]

#: Reference attacker precision ρ: the relative accuracy to which a real attacker matches the shared
#: quantity. Calibrated once by ``benchmarks/fidelity_digits.py`` on a calibration split of attack runs (never on
#: the samples whose correlation is reported) and frozen here.
DEFAULT_RHO: float = 1e-3

Tail = Literal["auto", "slq", "topk"]


def default_prior_variance(dynamic_range: float = 1.0) -> float:
    """``v0`` of a coordinate uniform on an interval of length ``dynamic_range``: ``R²/12``."""
    if dynamic_range <= 0:
        raise ValueError(f"invdefend.risk: dynamic_range={dynamic_range} must be > 0")
    return dynamic_range**2 / 12.0


@dataclass(frozen=True)
class NoiseModel:
    """The Gaussian noise a release carries, as variances along the shared quantity's directions.

    Args:
        isotropic: variance per coordinate in every direction (scalar or ``(B,)``), absolute units.
        shaped: variances ``(B, k)`` (or ``(k,)``) along the spectrum's top-k left singular vectors.
        rho: reference attacker precision; ``τ_ref = (rho·‖F(x)‖)²/m`` is added everywhere.
    """

    isotropic: float | Tensor = 0.0
    shaped: Tensor | None = None
    rho: float = DEFAULT_RHO

    def __post_init__(self) -> None:
        iso = torch.as_tensor(self.isotropic)
        if not torch.isfinite(iso).all() or (iso < 0).any():
            raise ValueError(f"invdefend.risk.NoiseModel: isotropic={self.isotropic} must be finite and >= 0")
        if self.shaped is not None and (not torch.isfinite(self.shaped).all() or (self.shaped < 0).any()):
            raise ValueError("invdefend.risk.NoiseModel: shaped variances must be finite and >= 0")
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise ValueError(f"invdefend.risk.NoiseModel: rho={self.rho} must be finite and >= 0")


def reference_noise(signal_norm: Tensor, out_dim: int, rho: float = DEFAULT_RHO) -> Tensor:
    """``τ_ref = (ρ·‖F(x)‖)² / m`` per sample."""
    return (rho * signal_norm) ** 2 / out_dim


def _terms(s2: Tensor, tau: Tensor, v0: float | Tensor) -> Tensor:
    """``1/(s²/τ + 1/v0) = v0·τ/(τ + v0·s²)``, with the limits s=0 → v0 and τ=0 (s>0) → 0. ``v0`` may be a
    tensor broadcasting against ``s2`` (a prior variance per sample, :func:`_shifted`)."""
    denom = tau + v0 * s2
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    fill = v0.to(denom).expand_as(denom) if isinstance(v0, Tensor) else torch.full_like(denom, v0)
    return torch.where(denom > 0, v0 * tau / safe, fill)


def _shifted(v0: float, information: Tensor | None) -> float | Tensor:
    """The prior variance per direction once isotropic information ``e`` ``(B,)`` is added to every direction's
    precision: ``1/(1/v0 + e)`` (``v0`` itself without it; THEORY §10.6)."""
    if information is None:
        return v0
    if not bool((information >= 0).all()):
        raise ValueError("invdefend.risk: extra_information must be >= 0 (NaN refused) per sample")
    return 1.0 / (1.0 / v0 + information)


def _column(v0: float | Tensor) -> float | Tensor:
    """``v0`` shaped to broadcast against ``(B, k)`` (a per-sample tensor gains a trailing axis)."""
    return v0.unsqueeze(-1) if isinstance(v0, Tensor) else v0


def invloss_from_values(
    singular_values: Tensor,
    tau: Tensor,
    *,
    in_dim: int,
    v0: float,
    tail_tau: Tensor | None = None,
    tail_sum: Tensor | None = None,
    rank_bound: int | None = None,
    extra_information: Tensor | None = None,
) -> Tensor:
    """InvLoss ``(B,)`` from top singular values ``(B, k)`` and per-direction noise variances ``(B, k)``.

    The unheld directions contribute ``tail_sum`` if given, else the conservative top-k treatment: each of
    the ``rank_bound − k`` unheld directions as if it had ``s_k`` with variance ``tail_tau`` (``(B,)``),
    and the ``d − rank_bound`` null directions ``v0`` each. ``extra_information`` ``(B,)``: precision added
    to every input direction (the layer-subset bound, THEORY §10.6; ``v0`` becomes ``1/(1/v0 + e)``
    everywhere; a ``tail_sum`` must have been evaluated with it).
    """
    s = singular_values
    if s.dim() == 1:
        s = s.unsqueeze(0)
    tau = torch.as_tensor(tau, dtype=s.dtype, device=s.device).expand_as(s)
    if v0 <= 0:
        raise ValueError(f"invdefend.risk: prior variance v0={v0} must be > 0")
    k = s.shape[-1]
    rank_bound = in_dim if rank_bound is None else min(rank_bound, in_dim)
    if k > in_dim:
        raise ValueError(f"invdefend.risk: {k} singular values for an input of dimension {in_dim}")
    v0_dir = _shifted(v0, None if extra_information is None else torch.as_tensor(extra_information).to(s))
    head = _terms(s**2, tau, _column(v0_dir)).sum(dim=-1)
    if tail_sum is not None:
        tail = tail_sum
    else:
        n_unheld = max(rank_bound - k, 0)
        if n_unheld and tail_tau is None:
            raise ValueError("invdefend.risk: tail_tau is needed for the top-k tail treatment")
        tail = torch.zeros_like(head)
        if n_unheld:
            tail = n_unheld * _terms(s[..., -1] ** 2, tail_tau.to(s), v0_dir)
        tail = tail + max(in_dim - max(rank_bound, k), 0) * v0_dir
    return (head + tail) / in_dim


def invloss(
    spectrum: Spectrum,
    noise: NoiseModel | None = None,
    *,
    v0: float | None = None,
    tail: Tail = "auto",
    extra_information: Tensor | None = None,
) -> Tensor:
    """Per-sample InvLoss ``(B,)`` of the samples in ``spectrum`` under ``noise``.

    Args:
        spectrum: top singular values (and optionally a tail quadrature rule).
        noise: the release's noise; default: only the reference attacker precision.
        v0: prior variance per input coordinate; default ``1/12`` (uniform on [0, 1]). Not used for the
            spectrum of a prior-whitened Jacobian (``spectrum.prior_weights``), which carries its prior.
        tail: ``"slq"`` (use the spectrum's quadrature rule), ``"topk"`` (conservative: unheld directions
            at ``s_k``), or ``"auto"`` (slq when the spectrum has a rule, else topk).
        extra_information: ``(B,)`` precision added to every input direction (whitened ones for a
            prior-whitened spectrum), absolute: the bound on what the parameters outside a layer subset add,
            ``s_R²/σ²`` (:mod:`invdefend.subset`, THEORY §10.6). Default: none.
    """
    noise = noise or NoiseModel()
    v0 = default_prior_variance() if v0 is None else float(v0)
    s = spectrum.singular_values
    tau, base = _noise_variances(spectrum, noise)
    if tail not in ("auto", "slq", "topk"):
        raise ValueError(f"invdefend.risk.invloss: tail={tail!r}; choose 'auto', 'slq' or 'topk'")
    use_slq = not spectrum.complete and spectrum.tail is not None and tail in ("auto", "slq")
    if tail == "slq" and spectrum.tail is None and not spectrum.complete:
        raise ValueError("invdefend.risk.invloss: tail='slq' but the spectrum has no quadrature rule; "
                         "estimate it with tail_quadrature or use tail='topk'")
    info = None if extra_information is None else torch.as_tensor(extra_information).to(s).expand(s.shape[0])
    tail_sum = None
    if use_slq:
        q = spectrum.tail
        assert q is not None
        tail_v0 = _shifted(1.0 if spectrum.prior_weights is not None else v0, info)
        if isinstance(tail_v0, Tensor):
            tail_v0 = tail_v0.view(-1, 1, 1).to(q.nodes)
        tail_sum = q.apply(_terms(q.nodes, base.view(-1, 1, 1).to(q.nodes), tail_v0)).to(s)
    if spectrum.prior_weights is not None:
        return _prior_invloss(spectrum, tau, base, tail_sum, _shifted(1.0, info))
    rank_bound = spectrum.k if spectrum.complete else spectrum.rank_bound
    return invloss_from_values(
        s, tau, in_dim=spectrum.in_dim, v0=v0, tail_tau=base, tail_sum=tail_sum, rank_bound=rank_bound,
        extra_information=info,
    )


def _noise_variances(spectrum: Spectrum, noise: NoiseModel) -> tuple[Tensor, Tensor]:
    """The attacker's noise variance along each held direction ``(B, k)`` and off them ``(B,)``: the reference
    precision plus the release's isotropic and shaped noise."""
    s = spectrum.singular_values
    ref = reference_noise(spectrum.signal_norm.to(s), spectrum.out_dim, noise.rho)
    iso = torch.as_tensor(noise.isotropic, dtype=s.dtype, device=s.device).expand(s.shape[0])
    base = ref + iso
    tau = base.unsqueeze(-1).expand_as(s).clone()
    if noise.shaped is not None:
        shaped = noise.shaped.to(s)
        if shaped.shape[-1] != s.shape[-1]:
            raise ValueError(
                f"invdefend.risk.invloss: shaped noise has {shaped.shape[-1]} variances but the spectrum holds "
                f"{s.shape[-1]} directions; allocate noise on this spectrum"
            )
        tau = tau + shaped
    return tau, base


def invloss_by_group(
    spectrum: Spectrum,
    noise: NoiseModel | None = None,
    *,
    groups: int,
    v0: float | None = None,
    prior: GaussianPrior | None = None,
) -> Tensor:
    """InvLoss of each of ``groups`` equal, consecutive blocks of the input's coordinates ``(B, groups)``:
    per token of an embedded sequence shaped ``(T, D)`` (``groups=T``), per row of an image, ...

    The posterior error of block ``g`` is ``Σ_i τ_i-term · ‖S_g A v_i‖²`` over the held directions
    (``A = C^{1/2}``, or ``√v0·I`` for the i.i.d. prior; ``S_g`` selects the block) plus the error left
    outside them, which is the spectrum's conservative top-k tail (:func:`invloss`, ``tail="topk"``) shared
    between blocks in proportion to the prior variance each block keeps outside the held directions. Exact
    for a complete spectrum; for any spectrum the blocks' mean equals :func:`invloss` (``tail="topk"``).

    Args:
        spectrum: with right singular vectors (input-space directions, whitened ones for a prior-whitened
            spectrum).
        noise: the release's noise (default: the reference precision only).
        groups: number of blocks; must divide ``spectrum.in_dim``.
        v0: the i.i.d. prior variance (default ``1/12``); unused with a prior-whitened spectrum.
        prior: the :class:`~invdefend.prior.GaussianPrior` a prior-whitened spectrum was whitened with.
    """
    d = spectrum.in_dim
    if not isinstance(groups, int) or groups < 1 or d % groups:
        raise ValueError(f"invdefend.risk.invloss_by_group: groups={groups!r} must divide the input dimension {d}")
    if spectrum.right_vectors is None:
        raise ValueError("invdefend.risk.invloss_by_group: the spectrum holds no right singular vectors; estimate "
                         "it with vectors (estimate_spectrum keeps them)")
    whitened = spectrum.prior_weights is not None
    if whitened and (prior is None or prior.dim != d):
        raise ValueError("invdefend.risk.invloss_by_group: a prior-whitened spectrum needs the GaussianPrior it was "
                         "whitened with (prior=...)")
    noise = noise or NoiseModel()
    v0 = 1.0 if whitened else (default_prior_variance() if v0 is None else float(v0))
    s = spectrum.singular_values.double()
    tau, _ = (t.double() for t in _noise_variances(spectrum, noise))
    V = spectrum.right_vectors.double()  # (B, d, k)
    B, _, k = V.shape
    if whitened:
        assert prior is not None
        AV = prior.to(torch.float64, V.device).sqrt_apply(V.transpose(1, 2)).transpose(1, 2)
        block_var = prior.coordinate_variances().double().to(V.device).reshape(groups, -1).sum(-1)  # tr C_gg
        mass = AV.pow(2).reshape(B, groups, -1, k).sum(2)  # (B, G, k): ‖S_g A v_i‖²
    else:
        mass = v0 * V.pow(2).reshape(B, groups, -1, k).sum(2)  # ‖S_g A v_i‖² with A = √v0·I
        block_var = torch.full((groups,), v0 * d / groups, dtype=torch.float64, device=V.device)
    # posterior variance along v_i, per unit of prior variance along it (whitened: the prior's is 1)
    unit_terms = _terms(s.unsqueeze(1) ** 2, tau.unsqueeze(1), v0) / v0
    head = (mass * unit_terms).sum(-1)
    left = (block_var.unsqueeze(0) - mass.sum(-1)).clamp_min(0.0)  # (B, G): prior variance off the held directions
    total = invloss(spectrum, noise, v0=v0, tail="topk").double() * d  # the sequence's whole posterior error
    tail_total = (total - head.sum(-1)).clamp_min(0.0)
    share = left / left.sum(-1, keepdim=True).clamp_min(1e-300)
    return (head + share * tail_total.unsqueeze(-1)) / (d // groups)


def _prior_invloss(
    spectrum: Spectrum, tau: Tensor, base: Tensor, tail_sum: Tensor | None, unit: float | Tensor = 1.0
) -> Tensor:
    """InvLoss of a prior-whitened spectrum (module docstring): held directions weighted by ``‖A v_i‖²``.
    ``unit``: the whitened prior variance per direction (1, or ``1/(1 + e)`` with extra information ``e``)."""
    s = spectrum.singular_values
    w = spectrum.prior_weights.to(s)  # type: ignore[union-attr]
    trace = float(spectrum.prior_trace)  # type: ignore[arg-type]
    head = (w * _terms(s**2, tau, _column(unit))).sum(dim=-1)
    left = (trace - w.sum(dim=-1)).clamp_min(0.0)  # prior variance outside the held directions
    if spectrum.complete:
        tail = left * unit  # all of it in the null space of J̃
    elif tail_sum is not None:
        tail = tail_sum
    else:
        tail = left * _terms(s[..., -1] ** 2, base.to(s), unit)
    return (head + tail) / spectrum.in_dim


def prior_mean_variance(spectrum: Spectrum) -> float | None:
    """``tr C / d`` of a prior-whitened spectrum (the InvLoss of a release that reveals nothing), else None."""
    if spectrum.prior_trace is None:
        return None
    return float(spectrum.prior_trace) / spectrum.in_dim


def predicted_psnr(invloss_value: Tensor | float, dynamic_range: float = 1.0) -> Tensor:
    """``10·log10(R² / InvLoss)``, comparable with an attack's PSNR (higher = more at risk)."""
    il = torch.as_tensor(invloss_value, dtype=torch.float64)
    return 10.0 * torch.log10(dynamic_range**2 / il.clamp_min(1e-30))


def leakage(invloss_value: Tensor | float, v0: float | None = None) -> Tensor:
    """``1 − InvLoss/v0 ∈ [0, 1]``: the fraction of the input's variance the release explains."""
    v0 = default_prior_variance() if v0 is None else float(v0)
    il = torch.as_tensor(invloss_value, dtype=torch.float64)
    return (1.0 - il / v0).clamp(0.0, 1.0)


@dataclass
class RiskEstimate:
    """Per-sample risk of a batch: InvLoss, predicted PSNR and leakage ``(B,)``, and how it was computed."""

    invloss: Tensor
    predicted_psnr: Tensor
    leakage: Tensor
    tail: str

    @classmethod
    def from_spectrum(
        cls,
        spectrum: Spectrum,
        noise: NoiseModel | None = None,
        *,
        v0: float | None = None,
        dynamic_range: float = 1.0,
        tail: Tail = "auto",
        extra_information: Tensor | None = None,
    ) -> "RiskEstimate":
        """Evaluate InvLoss and its reported forms for every sample of ``spectrum`` (``extra_information``:
        see :func:`invloss`)."""
        if spectrum.prior_weights is not None:
            v0 = prior_mean_variance(spectrum)  # leakage is relative to the data prior's variance
        v0 = default_prior_variance(dynamic_range) if v0 is None else v0
        il = invloss(spectrum, noise, v0=v0, tail=tail, extra_information=extra_information)
        used = "exact" if spectrum.complete else ("slq" if spectrum.tail is not None and tail != "topk" else "topk")
        return cls(invloss=il, predicted_psnr=predicted_psnr(il, dynamic_range), leakage=leakage(il, v0), tail=used)


def target_invloss(target_psnr: float, dynamic_range: float = 1.0, v0: float | None = None) -> float:
    """The InvLoss that a target predicted PSNR corresponds to, ``R²/10^(target/10)``, checked against what
    is reachable.

    A release that teaches the attacker nothing has InvLoss ``v0``, i.e. predicted PSNR ``10·log10(R²/v0)``;
    targets at or above that are met without noise, targets below it need InvLoss > v0, which no noise reaches.
    """
    v0 = default_prior_variance(dynamic_range) if v0 is None else v0
    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr):
        raise ValueError(f"invdefend: target_psnr={target_psnr!r} must be a finite number of dB")
    floor_psnr = 10 * math.log10(dynamic_range**2 / v0)
    if target_psnr <= floor_psnr:
        raise ValueError(
            f"invdefend: target_psnr={target_psnr} dB is out of range: even a release that reveals nothing "
            f"has predicted PSNR {floor_psnr:.2f} dB (v0={v0:.4g}, R={dynamic_range}); choose a target above it"
        )
    return dynamic_range**2 / 10 ** (target_psnr / 10)
