"""Batch-aware per-sample risk of a batch-MEAN gradient, with the rest of the batch unknown to the attacker.

THEORY §2 prices each sample of a batch through its own per-sample gradient Jacobian ``J_b``, as if the
attacker knew the other samples (the *conservative* risk: a batch only adds unknowns). This module computes
the risk with the other samples unknown, and reports it beside the conservative one.

**The release.** ``ḡ(X) = ∇θ (1/B)·Σ_b ℓ(f(x_b), y_b) = (1/B)·Σ_b g_b(x_b)`` (the batch-mean gradient, a
function of the concatenated batch ``X = (x_1, …, x_B) ∈ R^{B·d}``) is released with isotropic noise,
``ḡ̃ = ḡ(X) + ε``, ``ε ~ N(0, τ·I_m)``, ``τ = σ² + τ_ref``:

* ``σ²`` = ``noise.isotropic``: the variance per coordinate of the noise added to the *mean* gradient;
* ``τ_ref = (ρ·‖ḡ‖)²/m``: the reference attacker precision (THEORY §2) taken relative to the norm of the
  released mean gradient ``ḡ`` (a real attacker matches what was released, ``ḡ``, not one sample's ``g_b``).

Linearised at ``X``, ``J_X = ∂ḡ/∂X = (1/B)·[J_1 … J_B]`` (``m × B·d``). Under a block-diagonal prior
``X ~ N(μ_X, C_X)``, ``C_X = blockdiag(C, …, C)`` (samples independent, each ``N(μ, C)``; ``C = v0·I`` for the
i.i.d. prior), the Bayes attacker's posterior covariance is ``P_X = Λ⁻¹`` with ``Λ = C_X⁻¹ + J_XᵀJ_X/τ``, and
its error on sample ``b`` is the trace of the ``b``-th diagonal block. By the block-inverse (Schur complement)
formula, with ``Λ_bc = δ_bc·C⁻¹ + J_bᵀJ_c/(B²τ)``:

    (P_X)_bb = (Λ_bb − Λ_{b,−b}·Λ_{−b,−b}⁻¹·Λ_{−b,b})⁻¹  ⪰  Λ_bb⁻¹ = (C⁻¹ + J_bᵀJ_b/(B²τ))⁻¹.

The right side is the **conservative** risk: the attacker who knows ``x_{−b}`` subtracts their gradients from
``B·ḡ̃`` and sees ``g_b + B·ε``, i.e. sample ``b``'s own Jacobian under noise ``B²·τ`` — exactly the ``B²``
per-sample scaling :class:`~invdefend.defense.GradientDefense` uses (``PlanContext.scale``). Hence

    InvLoss_b(batch-aware) ≥ InvLoss_b(conservative),

with equality for ``B = 1`` or when the other samples' Jacobians are orthogonal to ``J_b``'s (``Λ_{b,−b} = 0``).

**Computing it matrix-free.** Whiten block-wise: ``X = μ_X + A_X·Z``, ``A_X = blockdiag(A, …, A)``,
``A·Aᵀ = C`` (``A = √v0·I`` for the i.i.d. prior). With ``J̃ = J_X·A_X = Σ_i s_i u_i v_iᵀ`` (``v_i ∈ R^{B·d}``,
``v_i^{(b)}`` its ``b``-th block) and ``t_i = τ/(τ + s_i²)``,
``P_X = A_X·(I + J̃ᵀJ̃/τ)⁻¹·A_Xᵀ = A_X·(Σ_i t_i v_i v_iᵀ + Π_null)·A_Xᵀ``. Since ``E_b·A_X = A·E_b`` (``E_b`` picks
block ``b``),

    InvLoss_b = (1/d)·[ Σ_i t_i·‖A v_i^{(b)}‖²  +  tail_b ].

``J̃`` is one operator (:class:`BatchMeanOperator` whitened by :class:`BlockWhitenedOperator`: one "sample" of
dimension ``B·d``) on which the existing estimators run unchanged: exact SVD, top-k block Krylov, Lanczos
quadrature. The unheld part ``tail_b``:

* **exact/complete** spectrum: the prior variance of block ``b`` the held directions do not carry,
  ``tr C − Σ_i ‖A v_i^{(b)}‖²``, lies in the null space of ``J̃`` (``t = 1``) and is left whole;
* **top-k with** ``tail="slq"`` (default): a *weighted* stochastic Lanczos quadrature per block — probes
  ``w = E_bᵀ·Aᵀ·z`` (Rademacher ``z`` on block ``b``, zero elsewhere, covariance ``E_bᵀAᵀA E_b``), deflated by
  the held ``v_i``, estimate ``Σ_{j unheld} t_j·‖A v_j^{(b)}‖²`` (null space included). All ``B`` blocks' probes
  run in one Lanczos call (the probe columns are independent);
* **top-k with** ``tail="topk"``: every unheld direction as if it had ``s_k`` (the largest it could have),
  ``tail_b = (tr C − Σ_i ‖A v_i^{(b)}‖²)·t_k``, which under-states InvLoss (over-states risk).

The joint spectrum holds ``B·k`` directions (``k`` per sample, as the per-sample spectrum does).

**Accuracy of the quadrature.** ``t(λ) = τ/(τ+λ)`` is completely monotone, so each probe's Gauss (Lanczos)
rule *under*-estimates its share of InvLoss: the ``"slq"`` figure over-states risk (the safe side), and more so
for the batch-aware risk, whose hidden directions sit at the weak end of a ``B`` times larger spectrum. With a
tiny ``τ`` (undefended, ``τ = τ_ref``) the bias is large and shrinks slowly with ``slq_steps``: measured on
LeNet at 16x16, B=4 (``benchmarks/batch_risk.py --validate``), 24 steps put the batch-aware PSNR ~6 dB above
the exact one, 128 steps ~1.5 dB, while the conservative one was within 0.5 dB; with isotropic noise of
relative energy ``≥ 1e-3`` the 32x32 figures no longer moved between 24 and 256 steps. Raise ``slq_steps``
for undefended batches; the gap it reports is then a lower estimate of the true gap.

**Scope.** Only isotropic noise on the mean gradient: a shaped plan lives in one sample's left singular basis
and is priced by the conservative per-sample risk. The mean gradient is taken as the mean of the per-sample
gradients, which is exact when samples do not interact in the forward pass (``mode="eval"``; BatchNorm in train
mode couples samples and is not modelled, as in :func:`~invdefend.jacobian.gradient_jacobian`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .jacobian import JacobianOperator, gradient_jacobian
from .prior import GaussianPrior
from .risk import (
    NoiseModel,
    default_prior_variance,
    invloss,
    leakage,
    predicted_psnr,
    reference_noise,
)
from .spectral import (
    SpectralQuadrature,
    Spectrum,
    estimate_spectrum,
    exact_spectrum,
    tail_quadrature,
    topk_spectrum,
    use_exact,
)

__all__ = ["BatchMeanOperator", "BatchRisk", "BlockWhitenedOperator", "batch_invloss", "batch_invloss_from_operator"]

Method = Literal["auto", "exact", "subspace"]
TailRule = Literal["slq", "topk"]


class BatchMeanOperator:
    """``J_X = (1/B)·[J_1 … J_B]``: the Jacobian of the batch mean of a per-sample quantity w.r.t. the whole
    concatenated batch, as one "sample" of dimension ``B·d`` (``batch_size == 1``).

    It has the :class:`~invdefend.jacobian.JacobianOperator` interface, so the spectral estimators run on it
    unchanged; each product is one batched product of the per-sample operator.

    Args:
        op: the per-sample Jacobians ``J_b`` of the batch (e.g. :func:`~invdefend.jacobian.gradient_jacobian`).
    """

    def __init__(self, op: JacobianOperator) -> None:
        self.op = op
        self.blocks = int(op.batch_size)
        self.block_dim = int(op.in_dim)
        self.batch_size = 1
        self.in_dim = self.blocks * self.block_dim
        self.out_dim = int(op.out_dim)
        self.dtype, self.device = op.dtype, op.device
        self.name = f"batch-mean {op.name}"

    def _check(self, block: Tensor, rows: int, what: str) -> None:
        if block.dim() != 3 or block.shape[0] != 1 or block.shape[1] != rows:
            raise ValueError(
                f"invdefend.batch_risk.BatchMeanOperator.{what}: expected a block shaped (1, {rows}, b), got "
                f"{tuple(block.shape)}"
            )

    def split(self, V: Tensor) -> Tensor:
        """``(1, B·d, b) -> (B, d, b)``: the per-sample blocks of joint vectors."""
        return V.reshape(self.blocks, self.block_dim, V.shape[-1])

    def join(self, V: Tensor) -> Tensor:
        """``(B, d, b) -> (1, B·d, b)``: inverse of :meth:`split`."""
        return V.reshape(1, self.in_dim, V.shape[-1])

    def matvec(self, V: Tensor) -> Tensor:
        """``J_X V = (1/B)·Σ_b J_b V^{(b)}``: ``(1, B·d, b) -> (1, m, b)``."""
        self._check(V, self.in_dim, "matvec")
        return (self.op.matvec(self.split(V.to(self.dtype))).sum(dim=0) / self.blocks).unsqueeze(0)

    def rmatvec(self, U: Tensor) -> Tensor:
        """``J_Xᵀ U``, block ``b`` = ``J_bᵀ U / B``: ``(1, m, b) -> (1, B·d, b)``."""
        self._check(U, self.out_dim, "rmatvec")
        U = U.to(self.dtype).expand(self.blocks, -1, -1)
        return self.join(self.op.rmatvec(U) / self.blocks)

    def values(self) -> Tensor:
        """The released mean ``(1/B)·Σ_b F(x_b)``: ``(1, m)``."""
        return self.op.values().mean(dim=0, keepdim=True)

    def dense(self, chunk: int = 256) -> Tensor:
        """``J_X`` as a dense ``(1, m, B·d)`` tensor (small problems)."""
        J = self.op.dense(chunk=chunk)  # (B, m, d)
        return (J.permute(1, 0, 2).reshape(self.out_dim, self.in_dim) / self.blocks).unsqueeze(0)

    def __repr__(self) -> str:
        return f"BatchMeanOperator({self.op!r}, B={self.blocks})"


class BlockWhitenedOperator:
    """``J̃ = J_X·blockdiag(A, …, A)`` with ``A·Aᵀ = C`` (``A = √v0·I`` for the i.i.d. prior).

    Args:
        joint: the batch-mean Jacobian.
        prior: the per-sample data prior ``N(μ, C)``, or None for the i.i.d. prior ``v0·I``.
        v0: the i.i.d. prior variance (used when ``prior`` is None).
    """

    def __init__(self, joint: BatchMeanOperator, prior: GaussianPrior | None = None, v0: float | None = None) -> None:
        self.joint = joint
        d = joint.block_dim
        if prior is not None:
            if prior.dim != d:
                raise ValueError(
                    f"invdefend.batch_risk: the prior is over samples of shape {prior.sample_shape} ({prior.dim} "
                    f"coordinates) but each input has {d} coordinates; fit the prior on inputs of the same shape"
                )
            self.prior: GaussianPrior | None = prior.to(dtype=joint.dtype, device=joint.device)
            self.block_trace = self.prior.trace
        else:
            self.prior = None
            self.v0 = default_prior_variance() if v0 is None else float(v0)
            self.block_trace = d * self.v0
        self.batch_size, self.in_dim, self.out_dim = 1, joint.in_dim, joint.out_dim
        self.dtype, self.device, self.name = joint.dtype, joint.device, f"whitened {joint.name}"

    def _root(self, X: Tensor, transpose: bool) -> Tensor:
        blocks = self.joint.split(X).transpose(1, 2)  # (B, b, d)
        if self.prior is None:
            out = blocks * math.sqrt(self.v0)
        else:
            out = self.prior.sqrt_t_apply(blocks) if transpose else self.prior.sqrt_apply(blocks)
        return self.joint.join(out.transpose(1, 2))

    def apply_root(self, Z: Tensor) -> Tensor:
        """``A_X·Z`` (``A`` on every block) for ``(1, B·d, b)``."""
        return self._root(Z, transpose=False)

    def apply_root_t(self, X: Tensor) -> Tensor:
        """``A_Xᵀ·X`` for ``(1, B·d, b)``."""
        return self._root(X, transpose=True)

    def matvec(self, V: Tensor) -> Tensor:
        """``J̃ V = J_X (A_X V)``: ``(1, B·d, b) -> (1, m, b)``."""
        return self.joint.matvec(self.apply_root(V.to(self.dtype)))

    def rmatvec(self, U: Tensor) -> Tensor:
        """``J̃ᵀ U = A_Xᵀ (J_Xᵀ U)``: ``(1, m, b) -> (1, B·d, b)``."""
        return self.apply_root_t(self.joint.rmatvec(U))

    def values(self) -> Tensor:
        """The released mean ``(1, m)`` (whitening changes input coordinates, not the release)."""
        return self.joint.values()

    def dense(self, chunk: int = 256) -> Tensor:
        """``J̃`` as a dense ``(1, m, B·d)`` tensor (small problems)."""
        J = self.joint.dense(chunk=chunk)  # (1, m, Bd): rows r ↦ A_Xᵀ r
        return self.apply_root_t(J.transpose(1, 2)).transpose(1, 2)

    def block_weights(self, right_vectors: Tensor) -> Tensor:
        """``‖A v_i^{(b)}‖²`` ``(B, k)`` of joint whitened right vectors ``(1, B·d, k)``: the pixel-space
        variance of sample ``b`` each joint direction carries."""
        return self.joint.split(self.apply_root(right_vectors.to(self.dtype))).pow(2).sum(dim=1)

    def block_probe_map(self, probes_per_block: int) -> Callable[[Tensor], Tensor]:
        """A ``probe_map`` for :func:`~invdefend.spectral.tail_quadrature` with ``B·P`` probe columns: columns
        ``b·P … b·P + P − 1`` become ``E_bᵀ·Aᵀ·z^{(b)}`` (block ``b`` of the probe through ``Aᵀ``, zero elsewhere)."""
        B, d, P = self.joint.blocks, self.joint.block_dim, probes_per_block

        def probe_map(z: Tensor) -> Tensor:
            mapped = self.apply_root_t(z)
            mask = torch.zeros(B, d, B, P, dtype=z.dtype, device=z.device)
            for b in range(B):
                mask[b, :, b, :] = 1
            return mapped * mask.reshape(1, B * d, B * P)

        return probe_map

    def __repr__(self) -> str:
        what = "i.i.d." if self.prior is None else f"prior rank {self.prior.rank}"
        return f"BlockWhitenedOperator({self.joint!r}, {what})"


@dataclass
class BatchRisk:
    """Per-sample risk of one batch-mean gradient release, batch-aware beside conservative.

    Attributes:
        invloss_batch_aware: ``(B,)`` InvLoss with the rest of the batch unknown (Schur complement).
        invloss_conservative: ``(B,)`` InvLoss from each sample's own Jacobian (attacker knows the rest), under
            the same release noise (``B²·τ`` per sample, ``τ_ref`` from ``‖ḡ‖``): ``≤ invloss_batch_aware``.
        invloss_conservative_own_reference: ``(B,)`` the conservative risk with ``τ_ref`` from each sample's own
            ``‖g_b‖`` — what :class:`~invdefend.defense.GradientDefense` records today. Not ordered against the
            batch-aware value (a different attacker precision).
        predicted_psnr_batch_aware, predicted_psnr_conservative, predicted_psnr_conservative_own_reference:
            ``10·log10(R²/InvLoss)`` ``(B,)``.
        leakage_batch_aware, leakage_conservative: ``1 − InvLoss/v̄`` ``(B,)`` (``v̄ = tr C/d`` or ``v0``).
        tail: how the unheld spectrum was priced, per risk: ``"exact"``, ``"slq"`` or ``"topk"``.
        noise: the release's noise model (``isotropic`` on the mean gradient).
        reference_noise: ``τ_ref = (ρ·‖ḡ‖)²/m`` on the mean gradient.
        mean_gradient_norm: ``‖ḡ‖``.
        joint_spectrum: the spectrum of the whitened ``J̃`` (one "sample" of dimension ``B·d``).
        block_spectrum: the joint spectrum seen by each sample ``(B, B·k)``: its values, with ``prior_weights``
            ``‖A v_i^{(b)}‖²`` and the per-block quadrature rule (what the batch-aware InvLoss is priced on).
        spectrum: the per-sample spectra behind the conservative risk.
        settings: what was asked for.
    """

    invloss_batch_aware: Tensor
    invloss_conservative: Tensor
    invloss_conservative_own_reference: Tensor
    predicted_psnr_batch_aware: Tensor
    predicted_psnr_conservative: Tensor
    predicted_psnr_conservative_own_reference: Tensor
    leakage_batch_aware: Tensor
    leakage_conservative: Tensor
    tail: dict[str, str]
    noise: NoiseModel
    reference_noise: float
    mean_gradient_norm: float
    joint_spectrum: Spectrum
    block_spectrum: Spectrum
    spectrum: Spectrum
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.invloss_batch_aware.shape[0])

    @property
    def psnr_gap(self) -> Tensor:
        """``(B,)`` conservative minus batch-aware predicted PSNR, dB (≥ 0 for exact spectra): how much the
        conservative treatment over-states each sample's risk."""
        return self.predicted_psnr_conservative - self.predicted_psnr_batch_aware

    def with_noise(self, noise: NoiseModel, *, tail: TailRule | None = None) -> BatchRisk:
        """The same batch priced under another release noise (no new spectral estimate); ``tail="topk"``
        prices an estimated spectrum's unheld part conservatively instead of by its quadrature rule."""
        s = dict(self.settings)
        if tail is not None:
            if tail not in ("slq", "topk"):
                raise ValueError(f"invdefend.batch_risk.BatchRisk.with_noise: tail={tail!r}; choose 'slq' or 'topk'")
            if tail == "slq" and not self.joint_spectrum.complete and self.joint_spectrum.tail is None:
                raise ValueError("invdefend.batch_risk.BatchRisk.with_noise: tail='slq' but the estimate has no "
                                 "quadrature rule; estimate with tail='slq' or price with tail='topk'")
            s["tail"] = tail
        return _price(self.block_spectrum, self.spectrum, self.joint_spectrum, noise, s["tail"], s["v0"],
                      s["prior_mean_variance"], s["dynamic_range"], s)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats (JSON-serialisable), spectra left out."""
        out: dict[str, Any] = {}
        for name in ("invloss_batch_aware", "invloss_conservative", "invloss_conservative_own_reference",
                     "predicted_psnr_batch_aware", "predicted_psnr_conservative",
                     "predicted_psnr_conservative_own_reference", "leakage_batch_aware", "leakage_conservative"):
            out[name] = getattr(self, name).double().tolist()
        out["psnr_gap"] = self.psnr_gap.double().tolist()
        out.update(tail=dict(self.tail), reference_noise=self.reference_noise,
                   mean_gradient_norm=self.mean_gradient_norm, settings=dict(self.settings))
        return out


def _check_noise(noise: Any) -> float:
    """Refuse a noise model the batch-mean release cannot carry; returns the isotropic variance on the mean."""
    where = "invdefend.batch_risk"
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"{where}: noise must be an invdefend.risk.NoiseModel, got {type(noise).__name__}; pass "
                        "NoiseModel(isotropic=σ², rho=ρ) (σ² = variance per coordinate on the mean gradient)")
    if noise.shaped is not None:
        raise ValueError(
            f"{where}: noise.shaped is set, but shaped variances live in one sample's left singular basis and have "
            "no meaning for the batch-mean release; the batch-aware risk prices isotropic noise on the mean gradient "
            "only: pass NoiseModel(isotropic=..., rho=...), or price a shaped plan with invdefend.risk.invloss on "
            "the per-sample spectrum (the conservative risk)"
        )
    iso = noise.isotropic.detach().double() if isinstance(noise.isotropic, Tensor) else torch.tensor(
        float(noise.isotropic), dtype=torch.float64)
    if iso.numel() != 1:
        raise ValueError(
            f"{where}: noise.isotropic has shape {tuple(iso.shape)}, but one mean gradient is released with one "
            "noise level: pass a scalar (the variance per coordinate added to the mean gradient)"
        )
    return float(iso.reshape(()))


def _check_args(noise: Any, prior: Any, v0: Any, k: Any, method: Any, tail: Any, slq_probes: Any) -> float:
    """Refuse what no estimate can use; returns the isotropic variance on the mean gradient."""
    where = "invdefend.batch_risk"
    sigma2 = _check_noise(noise)
    if prior is not None and not isinstance(prior, GaussianPrior):
        raise TypeError(f"{where}: prior must be an invdefend.prior.GaussianPrior or None, got {type(prior).__name__}; "
                        "fit one with GaussianPrior.fit(samples)")
    if prior is not None and v0 is not None:
        raise ValueError(f"{where}: pass either prior= (a GaussianPrior) or v0= (the i.i.d. prior), not both; "
                         "GaussianPrior.iid(shape, v0) is the i.i.d. prior as a GaussianPrior")
    bad_v0 = isinstance(v0, bool) or not isinstance(v0, (int, float)) or not (math.isfinite(v0) and v0 > 0)
    if v0 is not None and bad_v0:
        raise ValueError(f"{where}: v0={v0!r} must be a finite number > 0 (the prior variance per input coordinate)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: k={k!r} must be an int >= 1 (singular triplets held per sample)")
    if method not in ("auto", "exact", "subspace"):
        raise ValueError(f"{where}: method={method!r}; choose 'auto', 'exact' or 'subspace'")
    if tail not in ("slq", "topk"):
        raise ValueError(f"{where}: tail={tail!r}; choose 'slq' (weighted quadrature per block) or 'topk' "
                         "(conservative: unheld directions at s_k)")
    if isinstance(slq_probes, bool) or not isinstance(slq_probes, int) or slq_probes < 1:
        raise ValueError(f"{where}: slq_probes={slq_probes!r} must be an int >= 1")
    return sigma2


def _used(spec: Spectrum, tail: str) -> str:
    return "exact" if spec.complete else ("slq" if spec.tail is not None and tail == "slq" else "topk")


def batch_invloss_from_operator(
    op: JacobianOperator,
    *,
    noise: NoiseModel,
    prior: GaussianPrior | None = None,
    v0: float | None = None,
    k: int = 16,
    method: Method = "auto",
    tail: TailRule = "slq",
    dynamic_range: float = 1.0,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    oversample: int = 16,
    slq_probes: int = 4,
    slq_steps: int = 24,
    seed: int = 0,
) -> BatchRisk:
    """:func:`batch_invloss` for any per-sample operator whose release is the batch mean of its quantity.

    ``op`` holds the ``B`` per-sample Jacobians ``J_b`` (its ``values()`` are the per-sample quantities ``g_b``).
    See :func:`batch_invloss` for the arguments.
    """
    _check_args(noise, prior, v0, k, method, tail, slq_probes)
    if not (isinstance(dynamic_range, (int, float)) and math.isfinite(dynamic_range) and dynamic_range > 0):
        raise ValueError(f"invdefend.batch_risk: dynamic_range={dynamic_range!r} must be a finite number > 0 "
                         "(1 for images in [0, 1])")
    B, d, m = op.batch_size, op.in_dim, op.out_dim
    if prior is not None and prior.dim != d:
        raise ValueError(
            f"invdefend.batch_risk: the prior is over samples of shape {prior.sample_shape} ({prior.dim} "
            f"coordinates) but each input has {d} coordinates {tuple(op.sample_shape)}; fit the prior on inputs "
            "of the same shape"
        )
    v0_iid = None if prior is not None else (default_prior_variance(dynamic_range) if v0 is None else float(v0))
    mean_var = prior.mean_variance if prior is not None else float(v0_iid)  # type: ignore[arg-type]
    use_slq = tail == "slq"

    # -- conservative: each sample's own Jacobian (the InvRE path), noise B²·τ per sample ----------------------
    spec = estimate_spectrum(
        op, k, method=method, tail=use_slq, max_sweeps=max_sweeps, tol=tol, oversample=oversample,
        slq_probes=slq_probes, slq_steps=slq_steps, generator=torch.Generator(device=op.device).manual_seed(seed),
        prior=prior,
    )
    joint = BatchMeanOperator(op)

    # -- batch-aware: the whitened joint operator, weights per block ------------------------------------------
    white = BlockWhitenedOperator(joint, prior, v0_iid)
    K = B * k
    gen = torch.Generator(device=op.device).manual_seed(seed)
    if method == "exact" or (method == "auto" and use_exact(white.in_dim, m, K)):
        jspec = exact_spectrum(white)
        jspec.extra["start"] = "exact"
    else:
        jspec = topk_spectrum(white, K, oversample=oversample, max_sweeps=max_sweeps, tol=tol, generator=gen)
        jspec.extra["start"] = "cold"
        if use_slq and not jspec.complete:
            q = tail_quadrature(white, jspec, probes=B * slq_probes, steps=slq_steps, generator=gen,
                                probe_map=white.block_probe_map(slq_probes))
            n = q.nodes.shape[-1]
            # tail_quadrature averages over all B·P columns; each block's P columns form its own rule.
            jspec.tail = SpectralQuadrature(
                nodes=q.nodes.reshape(B, slq_probes, n), weights=q.weights.reshape(B, slq_probes, n) * B,
                probes=slq_probes, steps=q.steps,
            )
    assert jspec.right_vectors is not None
    weights = white.block_weights(jspec.right_vectors)  # (B, K')
    per_block = Spectrum(
        singular_values=jspec.singular_values.expand(B, -1), right_vectors=None, left_vectors=None, in_dim=d,
        out_dim=m, signal_norm=jspec.signal_norm.expand(B), method=jspec.method, sweeps=jspec.sweeps,
        residuals=None if jspec.residuals is None else jspec.residuals.expand(B, -1), tol=jspec.tol,
        complete=jspec.complete, tail=jspec.tail, prior_weights=weights, prior_trace=white.block_trace,
    )
    settings = {
        "batch_size": B, "in_dim": d, "out_dim": m, "k_per_sample": k, "k_joint": jspec.k, "method": method,
        "tail": tail, "prior": "iid" if prior is None else f"rank {prior.rank}", "v0": v0_iid,
        "prior_mean_variance": mean_var, "dynamic_range": dynamic_range, "slq_probes": slq_probes,
        "slq_steps": slq_steps, "seed": seed, "joint_sweeps": jspec.sweeps, "per_sample_sweeps": spec.sweeps,
        "reference": "tau_ref = (rho*||mean gradient||)^2/m on the mean gradient (x B^2 per sample)",
    }
    return _price(per_block, spec, jspec, noise, tail, v0_iid, mean_var, dynamic_range, settings)


def _price(
    per_block: Spectrum, spec: Spectrum, jspec: Spectrum, noise: NoiseModel, tail: str, v0_iid: float | None,
    mean_var: float, dynamic_range: float, settings: dict[str, Any],
) -> BatchRisk:
    """Both risks of one batch from its spectra under ``noise`` (isotropic on the mean gradient)."""
    sigma2 = _check_noise(noise)
    B, m = per_block.batch_size, per_block.out_dim
    g_mean = float(jspec.signal_norm.double().reshape(-1)[0])
    # conservative: each sample's own Jacobian, noise B²·τ per sample (GradientDefense's scale B²)
    per_sample_noise = NoiseModel(isotropic=B**2 * sigma2, rho=noise.rho)
    same_ref = replace(spec, signal_norm=torch.full_like(spec.signal_norm, B * g_mean))  # τ_ref·B² from ‖ḡ‖
    cons = invloss(same_ref, per_sample_noise, v0=v0_iid, tail=tail)  # type: ignore[arg-type]
    cons_own = invloss(spec, per_sample_noise, v0=v0_iid, tail=tail)  # type: ignore[arg-type]
    # batch-aware: the joint whitened spectrum with each sample's block weights, noise τ on the mean
    aware = invloss(per_block, NoiseModel(isotropic=sigma2, rho=noise.rho), tail=tail)  # type: ignore[arg-type]
    tau_ref = float(reference_noise(torch.tensor(g_mean, dtype=torch.float64), m, noise.rho))
    return BatchRisk(
        invloss_batch_aware=aware,
        invloss_conservative=cons,
        invloss_conservative_own_reference=cons_own,
        predicted_psnr_batch_aware=predicted_psnr(aware, dynamic_range),
        predicted_psnr_conservative=predicted_psnr(cons, dynamic_range),
        predicted_psnr_conservative_own_reference=predicted_psnr(cons_own, dynamic_range),
        leakage_batch_aware=leakage(aware, mean_var),
        leakage_conservative=leakage(cons, mean_var),
        tail={"batch_aware": _used(jspec, tail), "conservative": _used(spec, tail)},
        noise=noise,
        reference_noise=tau_ref,
        mean_gradient_norm=g_mean,
        joint_spectrum=jspec,
        block_spectrum=per_block,
        spectrum=spec,
        settings={**settings, "isotropic": sigma2, "rho": noise.rho},
    )


def batch_invloss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    noise: NoiseModel,
    prior: GaussianPrior | None = None,
    v0: float | None = None,
    k: int = 16,
    method: Method = "auto",
    tail: TailRule = "slq",
    dynamic_range: float = 1.0,
    mode: Literal["eval", "train"] = "eval",
    max_sweeps: int = 12,
    tol: float = 1e-2,
    oversample: int = 16,
    slq_probes: int = 4,
    slq_steps: int = 24,
    seed: int = 0,
) -> BatchRisk:
    """Per-sample risk of releasing the batch-mean gradient ``∇θ (1/B)·Σ_b loss_fn(model(x_b), y_b)`` + noise,
    batch-aware (the rest of the batch unknown) beside conservative (each sample alone, the rest known).

    Args:
        model, loss_fn, inputs, targets: as for :func:`~invdefend.invre.estimate_gradient_spectrum`
            (``loss_fn`` with mean reduction; ``B = inputs.shape[0]``).
        noise: the release's noise: ``isotropic`` = variance per coordinate added to the *mean* gradient
            (a scalar), ``rho`` = reference attacker precision, ``τ_ref = (ρ·‖ḡ‖)²/m`` from the released mean
            gradient's norm. ``shaped`` is refused (it lives in one sample's basis).
        prior: the per-sample data prior ``N(μ, C)`` (block-diagonal over the batch), or None for i.i.d. ``v0``.
        v0: the i.i.d. prior variance (default ``dynamic_range²/12``); not with ``prior``.
        k: singular triplets per sample: the per-sample spectra hold ``k``, the joint spectrum ``B·k``.
        method: ``"auto"`` (exact when :func:`~invdefend.spectral.use_exact` says so), ``"exact"`` or
            ``"subspace"``; applied to both spectra.
        tail: ``"slq"`` (weighted quadrature per block, default) or ``"topk"`` (conservative) for top-k spectra.
        dynamic_range: ``R`` for the predicted PSNR.
        mode: evaluate the model in ``"eval"`` (default) or ``"train"`` mode.
        max_sweeps, tol, oversample: top-k estimator settings; slq_probes (per sample), slq_steps: quadrature.
        seed: seed of the estimators' random starts and probes.
    """
    op = gradient_jacobian(model, loss_fn, inputs, targets, mode=mode)
    return batch_invloss_from_operator(
        op, noise=noise, prior=prior, v0=v0, k=k, method=method, tail=tail, dynamic_range=dynamic_range,
        max_sweeps=max_sweeps, tol=tol, oversample=oversample, slq_probes=slq_probes, slq_steps=slq_steps, seed=seed,
    )
