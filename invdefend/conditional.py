"""The sample-conditional InvLoss: the Bayes attacker's expected error on *this* sample, not on an average one.

THEORY's InvLoss, ``(1/d)·tr(A (I + J̃ᵀΣ⁻¹J̃)⁻¹ Aᵀ)``, is the posterior error averaged over inputs drawn from
the prior ``N(μ, C)``. The defender knows its own sample ``x``, and under an image prior samples differ a lot:
a smooth, mid-grey patch sits near the prior mean and is recovered well from the prior alone, a busy one is not
(on 32×32×3 photo patches the prior mean alone scores 6–14 dB PSNR depending on the patch). For the linearised
release ``y = J̃ z + ε`` (``z = A⁻¹(x − μ)``, ``ε ~ N(0, Σ)``) the posterior-mean attacker
``ẑ = (I + M)⁻¹ J̃ᵀ Σ⁻¹ y``, ``M = J̃ᵀΣ⁻¹J̃``, makes the pixel error ``A(z − ẑ) = A(I + M)⁻¹ z − A(I + M)⁻¹J̃ᵀΣ⁻¹ε``,
whose expectation over the noise is

    InvLoss(x | x) = (1/d) · [ ‖A (I + M)⁻¹ z‖²  +  tr(A (I + M)⁻¹ M (I + M)⁻¹ Aᵀ) ]
                   =          bias (this sample)  +  variance (the noise),

and whose average over ``z ~ N(0, I)`` is InvLoss again. With noise variances ``τ_i`` along the left singular
vectors, ``(I + M)⁻¹`` has the factors ``t_i = τ_i/(τ_i + s̃_i²)`` along ``v_i``:

* bias: ``A·Σ_{i≤k} t_i·(v_iᵀz)·v_i`` for the held directions, plus ``A·f(M_⊥)·z_⊥`` for the rest of ``z``
  (``f(λ) = τ/(τ + λ)`` on the deflated operator), evaluated by Lanczos from ``z_⊥`` (the rule stores its
  basis already multiplied by ``A``, so any noise level is evaluated without new products);
* variance: ``Σ_i w_i·t_i·(1 − t_i)`` with ``w_i = ‖A v_i‖²``, plus the weighted quadrature of ``t(1 − t)``
  over the tail.

It needs a data prior (the mean ``μ`` is what the bias is measured from); the i.i.d. prior is
:meth:`GaussianPrior.iid <invdefend.prior.GaussianPrior.iid>` with mean 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .jacobian import JacobianOperator
from .prior import GaussianPrior
from .risk import NoiseModel, reference_noise
from .spectral import Spectrum, estimate_spectrum, lanczos
from .whitened import WhitenedOperator

__all__ = ["SampleRule", "sample_rule", "conditional_invloss", "estimate_conditional", "with_sample_rule"]


@dataclass
class SampleRule:
    """What :func:`conditional_invloss` needs about each sample, for any noise level.

    Attributes:
        coords: ``(B, k)`` ``v_iᵀz``, the sample's whitened coordinates along the held directions.
        root_vectors: ``(B, d, k)`` ``A·v_i``.
        tail_root_basis: ``(B, d, n)`` ``A·Q`` for the Lanczos basis ``Q`` of the deflated ``J̃ᵀJ̃`` from ``z_⊥``.
        tail_tridiagonal: ``(B, n, n)`` its tridiagonal matrix (float64).
        tail_norm: ``(B,)`` ``‖z_⊥‖``.
    """

    coords: Tensor
    root_vectors: Tensor
    tail_root_basis: Tensor
    tail_tridiagonal: Tensor
    tail_norm: Tensor

    def select(self, index: Tensor) -> "SampleRule":
        """The rule for a subset of samples."""
        return SampleRule(*(t[index] for t in (self.coords, self.root_vectors, self.tail_root_basis,
                                                 self.tail_tridiagonal, self.tail_norm)))


def sample_rule(op: WhitenedOperator, spectrum: Spectrum, *, steps: int = 24) -> SampleRule:
    """Build the :class:`SampleRule` of the samples of ``op`` from their (whitened) ``spectrum``:
    ``steps`` Lanczos steps of the deflated ``J̃ᵀJ̃`` from each sample's ``z_⊥`` (none when the spectrum is
    complete: the rest of ``z`` is then in the null space and kept whole)."""
    if not isinstance(op, WhitenedOperator):
        raise TypeError(
            "invdefend.conditional.sample_rule: needs the prior-whitened operator (estimate with prior=...); the "
            "conditional error is measured from the prior mean"
        )
    if spectrum.right_vectors is None:
        raise ValueError("invdefend.conditional.sample_rule: the spectrum holds no right vectors")
    V = spectrum.right_vectors.to(op.dtype)
    z = op.prior.whiten(op.inputs.to(op.dtype))  # (B, d)
    coords = (V.transpose(1, 2) @ z.unsqueeze(-1)).squeeze(-1)  # (B, k)
    rest = z - (V @ coords.unsqueeze(-1)).squeeze(-1)

    def deflate(X: Tensor) -> Tensor:
        return X - V @ (V.transpose(1, 2) @ X)

    if spectrum.complete:
        norm = rest.norm(dim=-1)
        Q = (rest / norm.clamp_min(torch.finfo(rest.dtype).tiny).unsqueeze(-1)).unsqueeze(-1)  # (B, d, 1)
        T = torch.zeros(op.batch_size, 1, 1, dtype=torch.float64, device=rest.device)
    else:
        n = min(steps, max(1, op.in_dim - spectrum.k))
        Qp, Tp, normp = lanczos(lambda q: deflate(op.rmatvec(op.matvec(deflate(q)))), rest.unsqueeze(-1), n,
                                stop_on_breakdown=True)
        Q, T, norm = Qp[:, 0], Tp[:, 0], normp[:, 0]
    return SampleRule(
        coords=coords, root_vectors=op.apply_root(V), tail_root_basis=op.apply_root(Q), tail_tridiagonal=T,
        tail_norm=norm,
    )


def _kept(tau: Tensor, lam: Tensor) -> Tensor:
    """``t = τ/(τ + λ)``: the fraction of a whitened direction's prior variance the release leaves (1 where
    ``τ + λ = 0``: nothing seen)."""
    total = tau + lam
    return torch.where(total > 0, tau / total.clamp_min(1e-300), torch.ones_like(total))


def conditional_invloss(spectrum: Spectrum, noise: NoiseModel | None = None) -> Tensor:
    """Per-sample ``InvLoss(x | x)`` ``(B,)`` (module docstring) of a prior-whitened spectrum that holds a
    :class:`SampleRule` (``spectrum.sample_rule``) under ``noise``."""
    rule = spectrum.sample_rule
    if rule is None or spectrum.prior_weights is None:
        raise ValueError(
            "invdefend.conditional.conditional_invloss: the spectrum has no sample rule; estimate it with a data "
            "prior via invdefend.conditional.estimate_conditional"
        )
    noise = noise or NoiseModel()
    s = spectrum.singular_values.double()
    ref = reference_noise(spectrum.signal_norm.double(), spectrum.out_dim, noise.rho)
    base = ref + torch.as_tensor(noise.isotropic, dtype=torch.float64).expand(s.shape[0])
    tau = base.unsqueeze(-1).expand_as(s).clone()
    if noise.shaped is not None:
        tau = tau + noise.shaped.double()
    t = _kept(tau, s**2)
    bias = rule.root_vectors.double() @ (t * rule.coords.double()).unsqueeze(-1)  # (B, d, 1)
    theta, Y = torch.linalg.eigh(rule.tail_tridiagonal.double())  # (B, n), (B, n, n)
    b = base.view(-1, 1)
    f = _kept(b, theta.clamp_min(0))
    tail_vec = Y @ (f * Y[:, 0, :]).unsqueeze(-1)  # f(T) e1, (B, n, 1)
    bias = bias + rule.tail_norm.double().view(-1, 1, 1) * (rule.tail_root_basis.double() @ tail_vec)
    variance = (spectrum.prior_weights.double() * t * (1 - t)).sum(dim=-1)
    if spectrum.tail is not None and not spectrum.complete:
        q = spectrum.tail
        nodes = q.nodes.double()
        bq = base.view(-1, 1, 1)
        tq = _kept(bq, nodes)
        variance = variance + (q.weights.double() * tq * (1 - tq)).sum(dim=(-1, -2))
    return ((bias.squeeze(-1) ** 2).sum(dim=-1) + variance) / spectrum.in_dim


def with_sample_rule(spectrum: Spectrum, op: WhitenedOperator, *, steps: int = 24) -> Spectrum:
    """``spectrum`` with its :class:`SampleRule` attached."""
    return replace(spectrum, sample_rule=sample_rule(op, spectrum, steps=steps))


def estimate_conditional(
    op: JacobianOperator, k: int, *, prior: GaussianPrior, slq_steps: int = 24, **estimate: object
) -> Spectrum:
    """The prior-whitened spectrum of ``op`` (:func:`~invdefend.spectral.estimate_spectrum` with ``estimate``'s
    options) with its :class:`SampleRule` (``slq_steps`` more Lanczos steps per sample)."""
    white = WhitenedOperator(op, prior)
    spec = estimate_spectrum(white, k, slq_steps=slq_steps, **estimate)  # type: ignore[arg-type]
    return with_sample_rule(spec, white, steps=slq_steps)
