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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .jacobian import JacobianOperator

__all__ = ["Spectrum", "SpectralQuadrature", "exact_spectrum", "topk_spectrum", "tail_quadrature"]


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
            tail=None if self.tail is None else self.tail.select(idx),
            extra={
                key: value[idx] if isinstance(value, Tensor) and value.shape[:1] == (self.batch_size,) else value
                for key, value in self.extra.items()
            },
        )

    def is_finite(self) -> bool:
        """True when the singular values (and vectors, if held) contain no NaN/Inf."""
        parts = [self.singular_values, self.signal_norm, self.right_vectors, self.left_vectors]
        return all(t is None or bool(torch.isfinite(t).all()) for t in parts)


def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


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


def topk_spectrum(
    op: JacobianOperator,
    k: int = 16,
    *,
    oversample: int = 16,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    init: Tensor | Spectrum | None = None,
    generator: torch.Generator | None = None,
) -> Spectrum:
    """Top-``k`` singular triplets of ``J`` by randomised block Krylov iteration on ``JᵀJ``.

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
    b = min(k + oversample, d)
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
        Y = op.matvec(V)
        Z = op.rmatvec(Y)
        basis.append(V)
        images.append(Y)
        normals.append(Z)
        Q = torch.cat(basis, dim=2)
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
        room = d - Q.shape[2]  # the Krylov space cannot outgrow the input space
        if done or sweeps == max_sweeps or room <= 0:
            break
        V = _orthonormalise(Z, Q)[:, :, : min(b, room)]
    assert sigma is not None and W is not None and Q is not None and resid is not None and block_vecs is not None
    JQ = torch.cat(images, dim=2)
    sig = sigma.to(op.dtype)
    left = (JQ @ W) / sig.clamp_min(torch.finfo(op.dtype).tiny).unsqueeze(1)
    return Spectrum(
        singular_values=sig,
        right_vectors=Q @ W,
        left_vectors=left,
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


def tail_quadrature(
    op: JacobianOperator,
    spectrum: Spectrum,
    *,
    probes: int = 4,
    steps: int = 24,
    generator: torch.Generator | None = None,
) -> SpectralQuadrature:
    """Stochastic Lanczos quadrature for the part of ``spec(JᵀJ)`` outside the estimated top-k subspace.

    Rademacher probes ``z`` are projected on the complement of ``span(spectrum.right_vectors)``; Lanczos on
    the deflated ``P JᵀJ P`` from each projected probe gives a Gauss rule, and
    ``zᵀ P f(P JᵀJ P) P z ≈ ‖Pz‖² Σ_j (e₁ᵀ y_j)² f(θ_j)``. Averaged over probes this is an unbiased (up to the
    quadrature error) estimate of ``Σ f(λ)`` over the ``d − k`` complementary eigenvalues, null space included.
    Each step costs one ``J`` and one ``Jᵀ`` product on a block of ``probes`` vectors.
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
    z = deflate(z)
    znorm = z.norm(dim=1)  # (B, probes)
    q = z / znorm.clamp_min(torch.finfo(op.dtype).tiny).unsqueeze(1)
    Qs = [q]
    alphas, betas = [], []
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(B, probes, dtype=op.dtype, device=op.device)
    for j in range(steps):
        w = deflate(op.rmatvec(op.matvec(deflate(q))))
        alpha = (w * q).sum(dim=1)
        w = w - alpha.unsqueeze(1) * q - beta.unsqueeze(1) * q_prev
        Qmat = torch.stack(Qs, dim=-1)  # (B, d, probes, j+1): full re-orthogonalisation
        for _ in range(2):
            w = w - (Qmat * (Qmat * w.unsqueeze(-1)).sum(dim=1, keepdim=True)).sum(dim=-1)
        alphas.append(alpha)
        beta = w.norm(dim=1)
        if j == steps - 1:
            break
        betas.append(beta)
        q_prev, q = q, w / beta.clamp_min(torch.finfo(op.dtype).tiny).unsqueeze(1)
        Qs.append(q)
    n = len(alphas)
    T = torch.diag_embed(torch.stack(alphas, dim=-1).double())
    if n > 1:
        off = torch.stack(betas[: n - 1], dim=-1).double()
        T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    theta, Y = torch.linalg.eigh(T)  # (B, probes, n)
    weights = Y[..., 0, :] ** 2 * (znorm.double() ** 2).unsqueeze(-1) / probes
    return SpectralQuadrature(
        nodes=theta.clamp_min(0.0).to(op.dtype), weights=weights.to(op.dtype), probes=probes, steps=n
    )
