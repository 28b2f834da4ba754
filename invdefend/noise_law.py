"""Noise laws: what a placement's noise is, in a form attackers and InvRE read.

A placement (:mod:`invdefend.placements`) exposes the law of the noise it adds to a release, publicly,
because the strongest attacker knows it (THEORY §7, the defense-aware attacker) and because InvRE must
price exactly the release that was made:

* :class:`NoiseCovariance` — a Gaussian ``N(0, σ²·I + U diag(τ) Uᵀ)``, applied matrix-free (water-filling,
  isotropic noise, an isotropic floor, and any sum of them);
* :class:`BandPassLaw` — matrix-function noise ``c·J(JᵀJ + μ)⁻¹w`` drawn from the operator at every release,
  whose Gaussian approximation on a given exact spectrum is :meth:`BandPassLaw.covariance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .allocation import placement_variances
from .spectral import Spectrum

__all__ = ["NoiseCovariance", "BandPassLaw", "NoiseLaw"]


@dataclass(frozen=True)
class NoiseCovariance:
    """``Σ = sigma2_iso·I + U diag(tau) Uᵀ`` in ``R^{m×m}``, applied matrix-free.

    Attributes:
        sigma2_iso: isotropic variance ``σ² ≥ 0``. With ``σ² = 0`` the noise is confined to ``span(U)``,
            which makes ``Σ`` singular; a floor of ``floor_rel · max(tau)`` is then used (the complement of
            ``span(U)`` is treated as almost noise-free, which is what it is).
        basis: ``U``, ``(m, r)`` (one basis for all samples) or ``(B, m, r)`` (one per sample, for
            per-sample embedding noise); columns need not be orthonormal. ``None`` for isotropic noise.
        tau: ``(r,)`` or ``(B, r)`` variances along the columns, ``≥ 0``.
        floor_rel: relative floor used when ``sigma2_iso == 0``.

    ``Σ⁻¹`` is computed by Woodbury in the eigenbasis of the low-rank part: with the thin QR ``U = QR`` and
    the ``r × r`` eigendecomposition ``R diag(τ) Rᵀ = W Λ Wᵀ``, ``V = QW`` is orthonormal and
    ``Σ⁻¹ s = (s − V Vᵀ s)/σ² + V diag(1/(σ² + λ)) Vᵀ s`` — ``O(m r²)`` once, ``O(m r)`` per product.
    """

    sigma2_iso: float
    basis: Tensor | None = None
    tau: Tensor | None = None
    floor_rel: float = 1e-8

    def __post_init__(self) -> None:
        where = "invdefend.noise_law.NoiseCovariance"
        if not float(self.sigma2_iso) >= 0:
            raise ValueError(f"{where}: sigma2_iso={self.sigma2_iso} must be >= 0")
        for name in ("basis", "tau"):  # the noise model is data, not part of any graph
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, Tensor):
                    raise TypeError(f"{where}: {name} must be a torch.Tensor or None")
                object.__setattr__(self, name, value.detach())
        if (self.basis is None) != (self.tau is None):
            raise ValueError(f"{where}: pass basis and tau together (or neither, for isotropic noise)")
        if self.basis is not None and self.tau is not None:
            if self.basis.dim() not in (2, 3) or self.tau.dim() != self.basis.dim() - 1:
                raise ValueError(
                    f"{where}: basis must be (m, r) with tau (r,), or (B, m, r) with tau (B, r); got "
                    f"{tuple(self.basis.shape)} and {tuple(self.tau.shape)}"
                )
            if self.basis.shape[-1] != self.tau.shape[-1] or self.basis.shape[:-2] != self.tau.shape[:-1]:
                raise ValueError(
                    f"{where}: basis {tuple(self.basis.shape)} and tau {tuple(self.tau.shape)} disagree on r or B"
                )
            if bool((self.tau < 0).any()):
                raise ValueError(f"{where}: tau has negative entries; variances must be >= 0")
            if float(self.sigma2_iso) == 0.0 and float(self.tau.max()) == 0.0:
                raise ValueError(f"{where}: the covariance is zero; there is no noise to model (use dlg)")
        elif float(self.sigma2_iso) == 0.0:
            raise ValueError(f"{where}: sigma2_iso=0 without a low-rank part is no noise at all; use dlg")

    @property
    def dim(self) -> int | None:
        """``m`` when a basis fixes it, else ``None``."""
        return None if self.basis is None else int(self.basis.shape[-2])

    @property
    def effective_sigma2(self) -> float:
        """The isotropic variance actually used (``sigma2_iso``, or the floor when it is 0)."""
        if float(self.sigma2_iso) > 0 or self.tau is None:
            return float(self.sigma2_iso)
        return self.floor_rel * float(self.tau.max())

    def scaled(self, factor: float) -> NoiseCovariance:
        """``factor · Σ`` (e.g. ``1/n`` for the mean of ``n`` independent releases)."""
        if not factor > 0:
            raise ValueError(f"invdefend.noise_law.NoiseCovariance.scaled: factor={factor} must be > 0")
        tau = None if self.tau is None else self.tau * factor
        return NoiseCovariance(self.sigma2_iso * factor, self.basis, tau, self.floor_rel)

    def eigenbasis(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor] | None:
        """``(V, λ)``: orthonormal ``V`` ``(..., m, r)``, ``U diag(τ) Uᵀ = V diag(λ) Vᵀ`` (None: isotropic)."""
        if self.basis is None or self.tau is None:
            return None
        q, r = torch.linalg.qr(self.basis.to(dtype))
        small = r @ torch.diag_embed(self.tau.to(dtype)) @ r.transpose(-1, -2)
        lam, w = torch.linalg.eigh(0.5 * (small + small.transpose(-1, -2)))
        return q @ w, lam.clamp_min(0.0)

    def inverse_apply(self, s: Tensor, *, _eig: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``Σ⁻¹ s`` for ``s`` of shape ``(..., m)`` (batched bases: ``(B, m)``)."""
        s2 = self.effective_sigma2
        eig = _eig if _eig is not None else self.eigenbasis(s.dtype)
        if eig is None:
            return s / s2
        v, lam = (t.to(s.dtype) for t in eig)
        coef = (v.transpose(-1, -2) @ s.unsqueeze(-1)).squeeze(-1)  # (..., r)
        perp = s - (v @ coef.unsqueeze(-1)).squeeze(-1)
        return perp / s2 + (v @ (coef / (s2 + lam)).unsqueeze(-1)).squeeze(-1)

    def mahalanobis(self, s: Tensor, *, _eig: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``sᵀ Σ⁻¹ s`` over the last dim (differentiable in ``s``), computed without cancellation."""
        s2 = self.effective_sigma2
        eig = _eig if _eig is not None else self.eigenbasis(s.dtype)
        if eig is None:
            return s.pow(2).sum(-1) / s2
        v, lam = (t.to(s.dtype) for t in eig)
        coef = (v.transpose(-1, -2) @ s.unsqueeze(-1)).squeeze(-1)
        perp = s - (v @ coef.unsqueeze(-1)).squeeze(-1)
        return perp.pow(2).sum(-1) / s2 + (coef.pow(2) / (s2 + lam)).sum(-1)

    def dense(self, m: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """The full ``(m, m)`` matrix (or ``(B, m, m)``) — for tests on small ``m`` only."""
        m = self.dim if self.dim is not None else m
        if m is None:
            raise ValueError("invdefend.noise_law.NoiseCovariance.dense: pass m for an isotropic covariance")
        eye = torch.eye(m, dtype=dtype) * float(self.sigma2_iso)
        if self.basis is None or self.tau is None:
            return eye
        u = self.basis.to(dtype)
        return eye + u @ torch.diag_embed(self.tau.to(dtype)) @ u.transpose(-1, -2)

    def sample(self, shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw noise ``(*shape, m)`` (batched bases: ``shape`` must end with ``B``)."""
        m = self.dim
        if m is None:
            raise ValueError("invdefend.noise_law.NoiseCovariance.sample: an isotropic covariance needs dense(m) or m")
        shape = tuple(shape)
        eps = torch.randn(*shape, m, generator=generator, dtype=torch.float64) * float(self.sigma2_iso) ** 0.5
        if self.basis is not None and self.tau is not None:
            w = torch.randn(*shape, self.tau.shape[-1], generator=generator, dtype=torch.float64)
            w = w * self.tau.to(torch.float64).sqrt()
            eps = eps + (self.basis.to(torch.float64) @ w.unsqueeze(-1)).squeeze(-1)
        return eps.to(dtype)


@dataclass(frozen=True)
class BandPassLaw:
    """The law of a band-pass release: ``Σ_j c·J_j(J_jᵀJ_j + μ_j)⁻¹w_j`` over the probes ``j``, rescaled to energy
    exactly ``budget·‖g‖²``, plus an isotropic floor of variance ``floor·‖g‖²/m`` per coordinate.

    Attributes:
        mu: ``μ_j`` of each probe ``(P,)``, as the draw used it.
        budget: the band-pass energy relative to ``‖g‖²``.
        floor: the isotropic floor's energy relative to ``‖g‖²``.
        signal_energy: ``‖g‖²`` of the released gradient.
        out_dim: ``m``.
    """

    mu: Tensor
    budget: float
    floor: float
    signal_energy: float
    out_dim: int

    def covariance(self, spectrum: Spectrum, probe: int = 0, *, drop_below: float = 1e-10) -> NoiseCovariance:
        """The Gaussian law the draw approximates for one probe, on its exact, complete ``spectrum``
        (batch of one, the federated worst case): ``Σ = (floor·‖g‖²/m)·I + U diag(τ) Uᵀ`` with
        ``τ_i ∝ s_i²/(s_i² + μ)²`` summing to ``budget·‖g‖²``. Directions with ``s_i ≤ drop_below·s_1`` carry
        no band-pass noise and are dropped. It is the law the mechanism approximates, not its exact law: the
        draw comes from a Lanczos approximation and its norm is fixed by the rescaling."""
        if spectrum.left_vectors is None or not spectrum.complete:
            raise ValueError(
                "invdefend.noise_law.BandPassLaw.covariance: needs the exact, complete spectrum with left vectors "
                "(invdefend.spectral.exact_spectrum) of the probe's Jacobian"
            )
        S, U = spectrum.singular_values[probe], spectrum.left_vectors[probe]
        keep = S > drop_below * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
        r = int(keep.sum())
        if r == 0:
            raise ValueError("invdefend.noise_law.BandPassLaw.covariance: the probe's Jacobian is zero; no band-pass law")
        shaped = self.shaped_variances(torch.where(keep, S, torch.zeros_like(S)), probe)
        return NoiseCovariance(sigma2_iso=self.isotropic_variance, basis=U[:, :r].contiguous(), tau=shaped[:r])

    def shaped_variances(self, singular_values: Tensor, probe: int = 0) -> Tensor:
        """``τ_i`` along the probe's left singular vectors for its singular values ``(k,)`` (zeros get none)."""
        return placement_variances(singular_values.unsqueeze(0), self.budget * self.signal_energy, "band_pass",
                                   mu=float(self.mu[probe]))[0]

    @property
    def isotropic_variance(self) -> float:
        """The floor's variance per coordinate, ``floor·‖g‖²/m``."""
        return self.floor * self.signal_energy / self.out_dim


NoiseLaw = NoiseCovariance | BandPassLaw
