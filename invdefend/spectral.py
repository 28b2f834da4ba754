"""Spectra of Jacobian operators: exact SVD, randomised block Krylov top-k, and Lanczos quadrature.

* :func:`exact_spectrum` materialises ``J`` and takes its SVD (tests, small models).
* :func:`topk_spectrum` estimates the top-k singular triplets with a randomised block Krylov method on
  ``JᵀJ`` (block Lanczos with full re-orthogonalisation and a Rayleigh–Ritz step after every sweep). A
  *sweep* is one application of ``J`` and one of ``Jᵀ`` to a block of ``k + oversample`` vectors. It can be
  warm-started from a previous estimate's right singular vectors and reports its own convergence: the
  relative residual ``‖JᵀJ v − σ² v‖ / σ²`` of every Ritz pair, computed from products it already has.
* :func:`tail_quadrature` runs stochastic Lanczos quadrature (Hutchinson probes × Lanczos steps) on ``JᵀJ``
  deflated by the estimated top-k subspace, so that any spectral sum ``Σ f(λ)`` over the rest of the
  spectrum can be evaluated later for any noise level (see :mod:`invdefend.risk`).
* :func:`lanczos` is the one Lanczos kernel: the quadrature above and the matrix-function noise of the
  band-pass placement (:mod:`invdefend.placements.band_pass`) both run it.
* :func:`estimate_spectrum` is the one rule for "exact or top-k" (:func:`use_exact`); :class:`SpectrumTracker`
  adds the warm start from the previous estimate that the defenses use, and :func:`check_estimate` is the one
  trust check every consumer applies before it shapes noise on an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from .heap import with_heap_reuse
from .jacobian import JacobianOperator
from .prior import GaussianPrior
from .whitened import WhitenedOperator

__all__ = [
    "Spectrum", "SpectralQuadrature", "SpectrumTracker", "exact_spectrum", "topk_spectrum", "tail_quadrature",
    "lanczos", "use_exact", "estimate_spectrum", "keeps_no_images", "estimator_error", "check_estimate", "with_prior_weights",
]

Method = Literal["auto", "exact", "subspace"]


@dataclass
class SpectralQuadrature:
    """A Gauss quadrature rule for ``Σ_{λ in the unestimated part of spec(JᵀJ)} f(λ)``, per sample.

    ``sum(f) ≈ Σ_{probe, j} weights[b, probe, j] · f(nodes[b, probe, j])``.
    """

    nodes: Tensor
    weights: Tensor
    probes: int
    steps: int

    def apply(self, f_values: Tensor) -> Tensor:
        """Given ``f(nodes)`` (same shape as ``nodes``), the estimated sums ``(B,)``."""
        return (self.weights * f_values).sum(dim=(-1, -2))

    def select(self, index: Tensor) -> "SpectralQuadrature":
        """The rule for a subset of samples."""
        return replace(self, nodes=self.nodes[index], weights=self.weights[index])


@dataclass
class Spectrum:
    """Top singular triplets of ``J`` for a batch of samples, and how they were obtained.

    Attributes:
        singular_values: ``(B, k)``, descending.
        right_vectors: ``(B, d, k)`` input-space directions ``v_i`` (or None).
        left_vectors: ``(B, m, k)`` directions ``u_i`` of the shared quantity (or None).
        in_dim: ``d``; out_dim: ``m``.
        signal_norm: ``(B,)`` ``‖F(x)‖`` of each sample's shared quantity.
        method: ``"exact"`` or ``"subspace"``.
        sweeps: sweeps used (0 for exact).
        residuals: ``(B, k)`` relative residuals ``‖JᵀJ v − σ² v‖/σ²`` (zeros for exact).
        tol: residual tolerance the estimate was asked for.
        complete: True when ``k`` covers the whole rank ``min(m, d)`` (no tail).
        tail: an optional quadrature rule for the rest of the spectrum.
        prior_weights: ``(B, k)`` ``‖A v_i‖²`` when the spectrum is that of the prior-whitened ``J̃ = J·A``
            (THEORY §7; :func:`estimate_spectrum` with ``prior=``): the pixel-space variance each direction
            carries. ``None`` for the spectrum of ``J`` itself (the i.i.d. prior is then given to InvLoss as v0).
        prior_trace: ``tr C`` of that prior (``None`` without one).
        sample_rule: what the sample-conditional InvLoss needs (:class:`invdefend.conditional.SampleRule`),
            or ``None``.
    """

    singular_values: Tensor
    right_vectors: Tensor | None
    left_vectors: Tensor | None
    in_dim: int
    out_dim: int
    signal_norm: Tensor
    method: str
    sweeps: int = 0
    residuals: Tensor | None = None
    tol: float = 0.0
    complete: bool = False
    tail: SpectralQuadrature | None = None
    extra: dict = field(default_factory=dict)
    prior_weights: Tensor | None = None
    prior_trace: float | None = None
    sample_rule: Any = None

    @property
    def k(self) -> int:
        """Number of singular values held per sample."""
        return int(self.singular_values.shape[-1])

    @property
    def batch_size(self) -> int:
        """Number of samples."""
        return int(self.singular_values.shape[0])

    @property
    def rank_bound(self) -> int:
        """``min(m, d)``: the largest possible rank of J."""
        return min(self.in_dim, self.out_dim)

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool: every held Ritz pair met the residual tolerance (always True for exact)."""
        if self.residuals is None:
            return torch.ones(self.batch_size, dtype=torch.bool)
        return (self.residuals <= self.tol).all(dim=-1)

    def select(self, index: Tensor | list[int]) -> "Spectrum":
        """The spectrum of a subset of samples."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(
            self,
            singular_values=self.singular_values[idx],
            right_vectors=pick(self.right_vectors),
            left_vectors=pick(self.left_vectors),
            signal_norm=self.signal_norm[idx],
            residuals=pick(self.residuals),
            prior_weights=pick(self.prior_weights),
            sample_rule=None if self.sample_rule is None else self.sample_rule.select(idx),
            tail=None if self.tail is None else self.tail.select(idx),
            extra={
                key: value[idx] if isinstance(value, Tensor) and value.shape[:1] == (self.batch_size,) else value
                for key, value in self.extra.items()
            },
        )

    def is_finite(self) -> bool:
        """True when the singular values (and vectors, if held) contain no NaN/Inf."""
        parts = [self.singular_values, self.signal_norm, self.right_vectors, self.left_vectors, self.prior_weights]
        return all(t is None or bool(torch.isfinite(t).all()) for t in parts)

    def to(self, dtype: torch.dtype) -> "Spectrum":
        """The same spectrum with its floating-point tensors (values, vectors, norms, residuals, prior weights
        and tensors in ``extra``) in ``dtype``; the quadrature rule and the per-sample rule are kept as they are."""
        cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        return replace(
            self,
            singular_values=cast(self.singular_values),
            right_vectors=cast(self.right_vectors),
            left_vectors=cast(self.left_vectors),
            signal_norm=cast(self.signal_norm),
            residuals=cast(self.residuals),
            prior_weights=cast(self.prior_weights),
            extra={key: cast(value) for key, value in self.extra.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict (tensors and plain values); the quadrature rule and ``extra`` are not kept."""
        return {
            "singular_values": self.singular_values, "right_vectors": self.right_vectors,
            "left_vectors": self.left_vectors, "signal_norm": self.signal_norm, "residuals": self.residuals,
            "in_dim": self.in_dim, "out_dim": self.out_dim, "method": self.method, "sweeps": self.sweeps,
            "tol": self.tol, "complete": self.complete, "prior_weights": self.prior_weights,
            "prior_trace": self.prior_trace,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Spectrum":
        """Inverse of :meth:`state_dict`."""
        return cls(
            singular_values=state["singular_values"], right_vectors=state["right_vectors"],
            left_vectors=state["left_vectors"], in_dim=int(state["in_dim"]), out_dim=int(state["out_dim"]),
            signal_norm=state["signal_norm"], method=state.get("method", "subspace"), sweeps=int(state["sweeps"]),
            residuals=state["residuals"], tol=float(state["tol"]), complete=bool(state.get("complete", False)),
            prior_weights=state.get("prior_weights"), prior_trace=state.get("prior_trace"),
        )

    @property
    def whitened(self) -> bool:
        """True when this is the spectrum of the prior-whitened Jacobian (InvLoss then uses the data prior)."""
        return self.prior_weights is not None


def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


@with_heap_reuse
def exact_spectrum(
    op: JacobianOperator, k: int | None = None, *, chunk: int = 256, dtype: torch.dtype | None = None
) -> Spectrum:
    """Materialise ``J`` for every sample and take its SVD. Keeps the top ``k`` triplets (all if None).

    ``dtype`` (e.g. ``torch.float64``): cast ``J`` before the SVD; default the operator's dtype.
    """
    J = op.dense(chunk=chunk)
    if dtype is not None:
        J = J.to(dtype)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    r = S.shape[-1] if k is None else min(k, S.shape[-1])
    return Spectrum(
        singular_values=S[:, :r],
        right_vectors=Vh[:, :r, :].transpose(1, 2),
        left_vectors=U[:, :, :r],
        in_dim=op.in_dim,
        out_dim=op.out_dim,
        signal_norm=op.values().norm(dim=-1),
        method="exact",
        sweeps=0,
        residuals=torch.zeros(op.batch_size, r, dtype=S.dtype, device=S.device),
        complete=r >= min(op.in_dim, op.out_dim),
    )


#: The most memory :func:`topk_spectrum` keeps in the images ``J V`` of its sweeps; above it the images are
#: recomputed instead (the memory-lean path).
IMAGE_BYTES: int = 256 * 2**20

#: Columns per sweep of ``block="auto"`` on the memory-lean path.
LEAN_BLOCK: int = 8


def keeps_no_images(op: JacobianOperator | WhitenedOperator, block: int, sweeps: int) -> bool:
    """Whether :func:`topk_spectrum` takes the memory-lean path for ``op``: the images ``J V`` of ``sweeps``
    sweeps of ``block`` columns would exceed :data:`IMAGE_BYTES` (a large model)."""
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    return op.batch_size * op.out_dim * block * sweeps * itemsize > IMAGE_BYTES


def _orthonormalise(block: Tensor, against: Tensor | None) -> Tensor:
    """Orthonormal columns spanning ``block`` minus its projection on ``against``.

    Project-then-QR is repeated: when the projected block is rank deficient (the Krylov space became
    invariant, e.g. for a Jacobian with repeated singular values), QR completes it with arbitrary unit
    columns that still overlap ``against``; projecting and re-orthonormalising them keeps the whole basis
    orthonormal, which the Rayleigh–Ritz step assumes.
    """
    if against is None:
        return torch.linalg.qr(block).Q
    for _ in range(3):
        block = block - against @ (against.transpose(1, 2) @ block)
        block = torch.linalg.qr(block).Q
    return block


@with_heap_reuse
def topk_spectrum(
    op: JacobianOperator,
    k: int = 16,
    *,
    oversample: int = 16,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    init: Tensor | Spectrum | None = None,
    generator: torch.Generator | None = None,
    left: bool = True,
    block: int | Literal["auto"] | None = None,
    backward_tol: float | None = None,
) -> Spectrum:
    """Top-``k`` singular triplets of ``J`` by randomised block Krylov iteration on ``JᵀJ``.

    Memory: when the images ``J V`` of every sweep would exceed :data:`IMAGE_BYTES` (large models: ``m``
    is the parameter count), they are not kept. Each sweep then takes ``JᵀJ V`` in chunks of columns
    (:meth:`~invdefend.jacobian.JacobianOperator.gram_matvec`), the Rayleigh–Ritz step uses ``Qᵀ JᵀJ Q``
    (input-space only), and the left vectors cost one more product with the ``k`` Ritz vectors (skipped
    when ``left=False``). Same subspace, same values up to rounding.

    Args:
        op: the Jacobian operator (a batch of samples).
        k: triplets to return per sample (capped at ``min(m, d)``).
        oversample: extra block columns (accuracy of the k-th value improves with it).
        max_sweeps: at most this many sweeps (one ``J`` and one ``Jᵀ`` block product each).
        tol: stop once every top-k Ritz pair has relative residual ``‖JᵀJ v − σ²v‖/σ² ≤ tol``;
            the relative error of ``σ²`` is then at most ``tol`` (and typically far less).
        init: right singular vectors ``(B, d, j)`` (or a previous :class:`Spectrum`) to warm-start from;
            the block is completed with Gaussian columns.
        generator: random source for the starting block.
        left: compute the left singular vectors (the shared quantity's directions; the defenses need them,
            a risk estimate does not).
        block: columns per sweep (default ``k + oversample``). A block smaller than ``k`` grows the Krylov
            space in smaller steps (``k`` values need at least ``k / block`` sweeps): fewer products to the
            same accuracy when products are expensive. ``"auto"``: :data:`LEAN_BLOCK` columns when the
            images would not fit in :data:`IMAGE_BYTES` (a large model: on a width-16 ResNet-18, top-16 to 1 %
            took 72 products with 8 columns against 160 with 32), else ``k + oversample``.
        backward_tol: also stop once the estimate's backward error (:func:`estimator_error`: residuals
            relative to ``σ₁²``) is at most this; the defenses stop at half the error they trust
            (``max_residual / 2``) rather than iterate the weak pairs to ``tol``.
    """
    if k < 1:
        raise ValueError(f"invdefend.spectral.topk_spectrum: k={k} must be >= 1")
    if max_sweeps < 1:
        raise ValueError(f"invdefend.spectral.topk_spectrum: max_sweeps={max_sweeps} must be >= 1")
    if oversample < 0:
        raise ValueError(f"invdefend.spectral.topk_spectrum: oversample={oversample} must be >= 0")
    B, d, m = op.batch_size, op.in_dim, op.out_dim
    rank = min(m, d)
    k = min(k, rank)
    if block not in (None, "auto") and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"invdefend.spectral.topk_spectrum: block={block!r} must be an integer >= 1 or 'auto'")
    b = min(k + oversample, d)
    if block == "auto":
        b = min(b, LEAN_BLOCK) if keeps_no_images(op, b, max_sweeps) else b
    elif block is not None:
        b = min(block, d)
    lean = keeps_no_images(op, b, max_sweeps)
    gen = _generator_for(op.device, generator)
    start = torch.randn(B, d, b, generator=gen, device=op.device, dtype=op.dtype)
    warm = 0
    if init is not None:
        if isinstance(init, Spectrum):
            # Prefer the whole previous block (top-k plus the oversampling Ritz vectors) when it was kept.
            prev = init.extra.get("warm_start", init.right_vectors)
        else:
            prev = init
        if prev is None:
            raise ValueError("invdefend.spectral.topk_spectrum: the warm-start spectrum holds no right vectors")
        if prev.shape[0] != B or prev.shape[1] != d:
            raise ValueError(
                f"invdefend.spectral.topk_spectrum: warm start shaped {tuple(prev.shape)} does not match "
                f"the operator (B={B}, d={d}); pass None to start cold"
            )
        warm = min(prev.shape[2], b)
        start[:, :, :warm] = prev[:, :, :warm].to(start)
    V = _orthonormalise(start, None)

    basis: list[Tensor] = []  # V_j, orthonormal blocks of the Krylov space
    images: list[Tensor] = []  # J V_j
    normals: list[Tensor] = []  # JᵀJ V_j
    sigma = resid = W = Q = block_vecs = None
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        if lean:
            Z = op.gram_matvec(V)
        else:
            Y = op.matvec(V)
            Z = op.rmatvec(Y)
            images.append(Y)
        basis.append(V)
        normals.append(Z)
        Q = torch.cat(basis, dim=2)
        if lean:
            gram = (Q.transpose(1, 2) @ torch.cat(normals, dim=2)).double()  # Qᵀ JᵀJ Q
        else:
            JQ = torch.cat(images, dim=2)
            gram = (JQ.transpose(1, 2) @ JQ).double()
        gram = 0.5 * (gram + gram.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        block_vecs = evecs[:, :, :b]
        evals, evecs = evals[:, :k], evecs[:, :, :k]
        lam = evals.clamp_min(0.0)
        sigma = lam.sqrt()
        W = evecs.to(op.dtype)
        ritz = Q @ W
        residual_vec = torch.cat(normals, dim=2) @ W - ritz * lam.to(op.dtype).unsqueeze(1)
        scale = lam.clamp_min(torch.finfo(torch.float64).tiny)
        resid = (residual_vec.double().norm(dim=1) / scale).to(op.dtype)
        resid = torch.where(lam > 0, resid, torch.zeros_like(resid))
        done = bool((resid <= tol).all())
        if backward_tol is not None and not done:
            backward = (resid.double() * lam / lam[:, :1].clamp_min(torch.finfo(torch.float64).tiny)).max()
            done = bool(backward <= backward_tol)
        done = done and Q.shape[2] >= k
        room = d - Q.shape[2]  # the Krylov space cannot outgrow the input space
        if done or sweeps == max_sweeps or room <= 0:
            break
        V = _orthonormalise(Z, Q)[:, :, : min(b, room)]
    assert sigma is not None and W is not None and Q is not None and resid is not None and block_vecs is not None
    sig = sigma.to(op.dtype)
    right = Q @ W
    left_vectors = None
    if left:
        JW = op.matvec(right) if lean else torch.cat(images, dim=2) @ W
        left_vectors = JW / sig.clamp_min(torch.finfo(op.dtype).tiny).unsqueeze(1)
    return Spectrum(
        singular_values=sig,
        right_vectors=right,
        left_vectors=left_vectors,
        in_dim=d,
        out_dim=m,
        signal_norm=op.values().norm(dim=-1),
        method="subspace",
        sweeps=sweeps,
        residuals=resid,
        tol=tol,
        complete=k >= rank,
        extra={"warm_start_columns": warm, "block": b, "warm_start": Q @ block_vecs.to(op.dtype)},
    )


@with_heap_reuse
def tail_quadrature(
    op: JacobianOperator,
    spectrum: Spectrum,
    *,
    probes: int = 4,
    steps: int = 24,
    generator: torch.Generator | None = None,
    probe_map: Callable[[Tensor], Tensor] | None = None,
) -> SpectralQuadrature:
    """Stochastic Lanczos quadrature for the part of ``spec(JᵀJ)`` outside the estimated top-k subspace.

    Rademacher probes ``z`` are projected on the complement of ``span(spectrum.right_vectors)``; Lanczos on
    the deflated ``P JᵀJ P`` from each projected probe gives a Gauss rule, and
    ``zᵀ P f(P JᵀJ P) P z ≈ ‖Pz‖² Σ_j (e₁ᵀ y_j)² f(θ_j)``. Averaged over probes this is an unbiased (up to the
    quadrature error) estimate of ``Σ f(λ)`` over the ``d − k`` complementary eigenvalues, null space included.
    Each step costs one ``J`` and one ``Jᵀ`` product on a block of ``probes`` vectors.

    ``probe_map`` (e.g. ``Aᵀ`` of a data prior, on blocks ``(B, d, P)``) maps the probes first, so that the
    rule estimates the weighted sum ``Σ f(λ_j)·‖A v_j‖²`` (probes with covariance ``AᵀA``): the pixel-space
    error of the prior-whitened problem.
    """
    if probes < 1 or steps < 1:
        raise ValueError(f"invdefend.spectral.tail_quadrature: probes={probes} and steps={steps} must be >= 1")
    if spectrum.right_vectors is None:
        raise ValueError("invdefend.spectral.tail_quadrature: the spectrum holds no right vectors to deflate")
    B, d = op.batch_size, op.in_dim
    gen = _generator_for(op.device, generator)
    Vk = spectrum.right_vectors.to(op.dtype)
    steps = min(steps, max(1, d - spectrum.k))

    def deflate(X: Tensor) -> Tensor:
        return X - Vk @ (Vk.transpose(1, 2) @ X)

    z = torch.randint(0, 2, (B, d, probes), generator=gen, device=op.device).to(op.dtype) * 2 - 1
    if probe_map is not None:
        z = probe_map(z)
    z = deflate(z)
    _, T, znorm = lanczos(lambda q: deflate(op.rmatvec(op.matvec(deflate(q)))), z, steps)
    theta, Y = torch.linalg.eigh(T)  # (B, probes, n)
    n = T.shape[-1]
    weights = Y[..., 0, :] ** 2 * (znorm.double() ** 2).unsqueeze(-1) / probes
    return SpectralQuadrature(
        nodes=theta.clamp_min(0.0).to(op.dtype), weights=weights.to(op.dtype), probes=probes, steps=n
    )


def lanczos(
    apply: Callable[[Tensor], Tensor], start: Tensor, steps: int, *, stop_on_breakdown: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos with full re-orthogonalisation on a symmetric operator, for ``P`` start vectors per sample.

    Args:
        apply: the operator on a block ``(B, d, P)`` (e.g. ``q ↦ Jᵀ(J q)``), column by column.
        start: ``(B, d, P)`` start vectors (any norm).
        steps: at most this many steps (operator applications).
        stop_on_breakdown: stop early once every column's next residual is ``< 1e-12·|α|`` (an invariant
            subspace was found); otherwise run all ``steps``.

    Returns:
        ``(Q, T, norm)``: the orthonormal Lanczos vectors ``(B, P, d, n)``, the tridiagonal matrices
        ``(B, P, n, n)`` in float64, and the start vectors' norms ``(B, P)``. ``f(A)·start ≈
        norm·Q f(T) e₁`` and ``startᵀ f(A) start ≈ norm²·Σ_j (e₁ᵀy_j)² f(θ_j)`` (Gauss quadrature).
    """
    B, d, P = start.shape
    tiny = torch.finfo(start.dtype).tiny
    norm = start.norm(dim=1)  # (B, P)
    q = start / norm.clamp_min(tiny).unsqueeze(1)
    Qs, alphas, betas = [q], [], []
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(B, P, dtype=start.dtype, device=start.device)
    for j in range(steps):
        v = apply(q)
        alpha = (v * q).sum(dim=1)
        v = v - alpha.unsqueeze(1) * q - beta.unsqueeze(1) * q_prev
        Qm = torch.stack(Qs, dim=-1).permute(0, 2, 1, 3)  # (B, P, d, j+1)
        vp = v.permute(0, 2, 1).unsqueeze(-1)  # (B, P, d, 1)
        for _ in range(2):
            vp = vp - Qm @ (Qm.transpose(-1, -2) @ vp)
        v = vp.squeeze(-1).permute(0, 2, 1)
        alphas.append(alpha)
        beta = v.norm(dim=1)
        if j == steps - 1 or (stop_on_breakdown and bool((beta < 1e-12 * alpha.abs().clamp_min(1e-30)).all())):
            break
        betas.append(beta)
        q_prev, q = q, v / beta.clamp_min(tiny).unsqueeze(1)
        Qs.append(q)
    n = len(alphas)
    T = torch.diag_embed(torch.stack(alphas, dim=-1).double())
    if n > 1:
        off = torch.stack(betas[: n - 1], dim=-1).double()
        T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    return torch.stack(Qs[:n], dim=-1).permute(0, 2, 1, 3), T, norm


def use_exact(in_dim: int, out_dim: int, k: int, exact_max_dim: int = 0) -> bool:
    """The one rule for "exact SVD or top-k estimate": exact when the rank bound ``min(d, m)`` is at most
    ``max(k, exact_max_dim)``. Then ``min(d, m)`` products give the whole spectrum, which costs no more than
    a top-k estimate that would hold it all anyway (``k ≥ min(d, m)``), or is small enough to afford."""
    return min(in_dim, out_dim) <= max(k, exact_max_dim)


def estimate_spectrum(
    op: JacobianOperator | WhitenedOperator,
    k: int = 16,
    *,
    method: Method = "auto",
    exact_max_dim: int = 0,
    tail: bool = False,
    init: Tensor | Spectrum | None = None,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    oversample: int = 16,
    slq_probes: int = 4,
    slq_steps: int = 24,
    generator: torch.Generator | None = None,
    prior: GaussianPrior | None = None,
    left: bool = True,
    block: int | Literal["auto"] | None = None,
) -> Spectrum:
    """The spectrum of ``op``: exact (:func:`exact_spectrum`) when ``method="exact"`` or, with
    ``method="auto"``, when :func:`use_exact` says so; else the top-k estimate (:func:`topk_spectrum`,
    warm-started from ``init``) with, when ``tail``, a quadrature rule for the rest (:func:`tail_quadrature`).
    ``spectrum.extra["start"]`` says which: ``"exact"``, ``"warm"`` or ``"cold"``.

    With a data ``prior`` (THEORY §7) the same path runs on the prior-whitened ``J̃ = J·A``
    (:class:`~invdefend.whitened.WhitenedOperator`), the quadrature's probes are mapped by ``Aᵀ``, and the
    spectrum carries ``prior_weights = ‖A v_i‖²``: InvLoss is then the pixel-space error under that prior
    (:func:`invdefend.conditional.estimate_conditional` adds what the sample-conditional InvLoss needs).
    ``left=False`` skips the left singular vectors (a product with the ``k`` Ritz vectors on large models);
    ``block``: see :func:`topk_spectrum`."""
    if method not in ("auto", "exact", "subspace"):
        raise ValueError(f"invdefend.spectral.estimate_spectrum: method={method!r}; choose 'auto', 'exact' or 'subspace'")
    if prior is not None:
        op = WhitenedOperator(op, prior)
    return _estimate(op, k, method=method, exact_max_dim=exact_max_dim, tail=tail, init=init, max_sweeps=max_sweeps,
                     tol=tol, oversample=oversample, slq_probes=slq_probes, slq_steps=slq_steps, generator=generator,
                     left=left, block=block)


def _estimate(
    op: JacobianOperator | WhitenedOperator, k: int, *, method: Method, exact_max_dim: int, tail: bool,
    init: Tensor | Spectrum | None, max_sweeps: int, tol: float, oversample: int, slq_probes: int, slq_steps: int,
    generator: torch.Generator | None, left: bool = True, block: int | Literal["auto"] | None = None,
) -> Spectrum:
    if method == "exact" or (method == "auto" and use_exact(op.in_dim, op.out_dim, k, exact_max_dim)):
        spec = exact_spectrum(op)  # the whole spectrum: risk is then exact, no tail treatment needed
        spec.extra["start"] = "exact"
        return with_prior_weights(spec, op)
    spec = topk_spectrum(op, k, oversample=oversample, max_sweeps=max_sweeps, tol=tol, init=init, generator=generator,
                         left=left, block=block)
    spec.extra["start"] = "cold" if init is None else "warm"
    if tail and not spec.complete:
        probe_map = op.apply_root_t if isinstance(op, WhitenedOperator) else None
        spec.tail = tail_quadrature(
            op, spec, probes=slq_probes, steps=slq_steps, generator=generator, probe_map=probe_map
        )
    return with_prior_weights(spec, op)


def with_prior_weights(spec: Spectrum, op: JacobianOperator | WhitenedOperator) -> Spectrum:
    """``spec`` with ``prior_weights`` and ``prior_trace`` filled in when ``op`` is prior-whitened (else as is)."""
    if not isinstance(op, WhitenedOperator) or spec.right_vectors is None:
        return spec
    return replace(spec, prior_weights=op.prior_weights(spec.right_vectors), prior_trace=op.prior.trace)


def estimator_error(spec: Spectrum) -> float:
    """The estimate's backward error: the largest Ritz residual ``‖JᵀJv_i − σ_i²v_i‖`` relative to ``σ₁²``.

    A value ``η`` means every held pair is an exact eigenpair of some ``JᵀJ + E`` with ``‖E‖ ≤ η·σ₁²``.
    Unlike the per-pair relative residual it does not blow up on a flat or clustered tail, where Ritz
    vectors mix freely among nearly equal values (harmless for the noise, which covers their span). 0 for
    an exact spectrum; NaN propagates (and counts as a failure).
    """
    if spec.residuals is None or spec.singular_values.numel() == 0:
        return 0.0
    s2 = spec.singular_values.double() ** 2
    top = s2[:, :1]
    err = spec.residuals.double() * s2 / top.clamp_min(torch.finfo(torch.float64).tiny)
    err = torch.where(top > 0, err, torch.zeros_like(err))
    return float(err.max())


def check_estimate(spec: Spectrum, max_residual: float) -> Spectrum:
    """The one trust check: return ``spec`` if it is finite and its :func:`estimator_error` is at most
    ``max_residual``; raise :class:`FloatingPointError` (NaN/Inf) or :class:`RuntimeError` (not converged)."""
    if not spec.is_finite():
        raise FloatingPointError("the estimated spectrum contains NaN/Inf")
    err = estimator_error(spec)
    if not math.isfinite(err) or err > max_residual:
        raise RuntimeError(
            f"the estimator did not converge in {spec.sweeps} sweeps (error {err:.3g} > max_residual {max_residual})"
        )
    return spec


class SpectrumTracker:
    """Estimates the spectrum of successive batches, warm-started from the last trusted estimate.

    The exact spectrum is taken when :func:`use_exact` says so. Otherwise the top-k estimator starts from
    the last trusted estimate's *left* (shared-quantity) subspace: the new batch starts from ``Jᵀ U_prev``,
    because right (input-space) singular vectors belong to one sample while the leaking directions of the
    shared quantity are largely shared between samples and drift slowly (one ``Jᵀ`` product). A warm start
    runs ``sweeps`` sweeps; if that leaves the estimate above ``max_residual``, up to ``cold_sweeps`` more
    continue from it. A cold start runs up to ``cold_sweeps``. With ``warm_start=False`` every estimate is cold.
    On a large model (:func:`keeps_no_images`: products are expensive) every estimate also stops as soon as
    its backward error is at most ``max_residual / 2``: trusted with a 2x margin, without iterating the
    weakest pairs to ``tol`` (ResNet-18's cold refresh: 3 sweeps instead of 6). A small model's estimates
    iterate to ``tol``: its noise is placed on that subspace for a whole refresh period, and stopping its cold
    start at the margin (tried on 2026-12-01) cost 4.3 points of photo accuracy at noise energy 1 (LeNet,
    8 seeds, 56.8 % against 61.1 %; docs/theory.md §10.4).

    :meth:`estimate` returns the raw estimate; the caller applies :func:`check_estimate` and, if it trusts
    the result, hands it to :meth:`accept` (the next warm start). Defenses hold one as their ``estimator``,
    which tests may replace or wrap to inject failures.
    """

    def __init__(
        self,
        k: int,
        *,
        exact_max_dim: int = 0,
        oversample: int = 16,
        sweeps: int = 2,
        cold_sweeps: int = 12,
        max_residual: float = 0.5,
        warm_start: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.k, self.exact_max_dim, self.oversample = int(k), int(exact_max_dim), int(oversample)
        self.sweeps, self.cold_sweeps, self.max_residual = int(sweeps), int(cold_sweeps), float(max_residual)
        self.warm_start = warm_start
        self.generator = generator
        self.previous: Spectrum | None = None  # the last trusted estimate (the next warm start)

    @with_heap_reuse
    def estimate(self, op: JacobianOperator | WhitenedOperator) -> Spectrum:
        """The spectrum of ``op`` (exact, warm or cold top-k; ``extra["start"]`` says which), unchecked.

        A prior-whitened operator gives a spectrum with its ``prior_weights`` (:func:`with_prior_weights`)."""
        if use_exact(op.in_dim, op.out_dim, self.k, self.exact_max_dim):
            return estimate_spectrum(op, self.k, method="exact")  # weights attached there
        init = self._warm_start(op)
        warm = init is not None
        sweeps = self.sweeps if warm else self.cold_sweeps
        # On a large model every product is expensive: stop once the estimate is trusted with a 2x margin rather
        # than iterate the weak pairs to tol. A small model iterates to tol (placement quality: see docstring).
        lean = keeps_no_images(op, min(self.k + self.oversample, op.in_dim), sweeps)
        spec = topk_spectrum(
            op, self.k, oversample=self.oversample, max_sweeps=sweeps, init=init, generator=self.generator,
            backward_tol=self.max_residual / 2 if lean else None,
        )
        spec.extra["start"] = "warm" if warm else "cold"
        if warm and spec.is_finite() and estimator_error(spec) > self.max_residual:
            # Tracking lost (the spectrum moved): keep iterating from where the warm sweeps got.
            more = topk_spectrum(
                op, self.k, oversample=self.oversample, max_sweeps=self.cold_sweeps, tol=self.max_residual,
                init=spec, generator=self.generator,
            )
            spec = replace(more, sweeps=spec.sweeps + more.sweeps, extra={**more.extra, "start": "warm+extended"})
        return with_prior_weights(spec, op)

    def accept(self, spec: Spectrum) -> None:
        """Remember a trusted estimate as the next warm start."""
        self.previous = spec

    def _warm_start(self, op: JacobianOperator) -> Tensor | None:
        """``Jᵀ U_prev`` (right vectors to start from), or None for a cold start."""
        prev = self.previous
        if not self.warm_start or prev is None or prev.left_vectors is None \
                or prev.out_dim != op.out_dim or prev.in_dim != op.in_dim:
            return None
        U = prev.left_vectors.to(device=op.device, dtype=op.dtype)
        pick = torch.arange(op.batch_size) % U.shape[0]
        V0 = op.rmatvec(U[pick][:, :, : self.k + self.oversample])
        if not bool(torch.isfinite(V0).all()):
            return None
        return V0
