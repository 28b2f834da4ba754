"""The attacker's data prior: a Gaussian ``N(μ, C)`` on the private input, with ``C`` low-rank plus diagonal.

InvLoss under an i.i.d. prior ``v0·I`` prices an attacker who knows nothing about images. Natural images are
far from i.i.d. (on 32×32×3 photo patches the top 10 % of the covariance's eigen-directions hold ~97 % of
the variance), and an attacker who knows that needs far fewer directions. :class:`GaussianPrior` carries

    C = Q·diag(λ)·Qᵀ + diag(δ),      Q: (d, r) orthonormal,  λ ≥ 0: (r,),  δ > 0: (d,)

and the square root the risk model works through (THEORY §7): a square ``A`` with ``A·Aᵀ = C``,

    A = D^{1/2}·(I + P·diag(√(1+γ) − 1)·Pᵀ),    D = diag(δ),   D^{-1/2}·Q·diag(√λ) = P·diag(√γ)·Rᵀ (thin SVD),

so that ``x = μ + A·z`` with ``z ~ N(0, I)``. Products with ``A``, ``Aᵀ``, ``C⁻¹`` (Woodbury) cost ``O(d·r)``.

Where ``C`` comes from:

* :meth:`GaussianPrior.fit` — fitted from samples (a calibration split the attacker could plausibly have,
  never the sample being assessed): the top-``rank`` principal directions, plus the residual variance of every
  coordinate on the diagonal, so ``diag(C)`` equals the sample variance;
* :meth:`GaussianPrior.from_loader` — the same from the batches of a data loader;
* :class:`OnlinePrior` — tracked online from captured batches (a seeded reservoir of past samples, refitted
  on demand), for a defense that sees the data only as it trains;
* :meth:`GaussianPrior.iid` — ``v0·I``, the i.i.d. special case every earlier figure used;
* or built by hand from a covariance the user knows (:meth:`GaussianPrior.from_covariance`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianPrior", "OnlinePrior", "DEFAULT_RANK"]

#: Principal directions kept by :meth:`GaussianPrior.fit` unless told otherwise.
DEFAULT_RANK: int = 64


def _check_samples(where: str, samples: Tensor) -> Tensor:
    if not isinstance(samples, Tensor):
        raise TypeError(f"invdefend.prior.{where}: samples must be a torch.Tensor (N, ...), got {type(samples).__name__}")
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise ValueError(
            f"invdefend.prior.{where}: need a batch of at least 2 samples (N, ...), got shape {tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        raise ValueError(
            f"invdefend.prior.{where}: samples have dtype {samples.dtype}; convert to float (e.g. uint8 images / 255)"
        )
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"invdefend.prior.{where}: samples contain NaN or Inf; clean the data first")
    return samples


@dataclass(frozen=True, eq=False)
class GaussianPrior:
    """``N(mean, C)`` over flattened samples of shape ``sample_shape``, ``C = Q diag(λ) Qᵀ + diag(δ)``.

    Attributes:
        mean: ``(d,)`` prior mean ``μ``.
        basis: ``(d, r)`` orthonormal principal directions ``Q`` (``r`` may be 0).
        variances: ``(r,)`` variance ``λ`` added along each principal direction.
        diagonal: ``(d,)`` per-coordinate variance ``δ > 0``.
        sample_shape: shape of one sample, e.g. ``(3, 32, 32)``.
    """

    mean: Tensor
    basis: Tensor
    variances: Tensor
    diagonal: Tensor
    sample_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        d = int(math.prod(self.sample_shape))
        if self.mean.shape != (d,) or self.diagonal.shape != (d,):
            raise ValueError(
                f"invdefend.prior.GaussianPrior: mean {tuple(self.mean.shape)} and diagonal "
                f"{tuple(self.diagonal.shape)} must both be ({d},) for samples of shape {self.sample_shape}"
            )
        if self.basis.dim() != 2 or self.basis.shape[0] != d or self.variances.shape != (self.basis.shape[1],):
            raise ValueError(
                f"invdefend.prior.GaussianPrior: basis {tuple(self.basis.shape)} must be ({d}, r) and variances "
                f"{tuple(self.variances.shape)} must be (r,)"
            )
        if not bool((self.diagonal > 0).all()) or not bool(torch.isfinite(self.diagonal).all()):
            raise ValueError("invdefend.prior.GaussianPrior: the diagonal variances must be finite and > 0")
        if not bool((self.variances >= 0).all()) or not bool(torch.isfinite(self.variances).all()):
            raise ValueError("invdefend.prior.GaussianPrior: the principal variances must be finite and >= 0")
        # the square root's factors, computed once
        scaled = self.basis * (self.variances.clamp_min(0).sqrt() / self.diagonal.sqrt().unsqueeze(-1))
        if scaled.shape[1]:
            P, sv, _ = torch.linalg.svd(scaled, full_matrices=False)
        else:
            P, sv = scaled, scaled.new_zeros(0)
        object.__setattr__(self, "_P", P)
        object.__setattr__(self, "_root_gain", (1 + sv**2).sqrt() - 1)
        object.__setattr__(self, "_inv_gain", 1 / (1 + sv**2) - 1)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, samples: Tensor, rank: int = DEFAULT_RANK, *, min_variance: float = 1e-6, method: str = "exact",
        seed: int = 0,
    ) -> "GaussianPrior":
        """Fit ``μ`` and ``C`` from samples ``(N, ...)``: top-``rank`` principal directions plus, on the
        diagonal, each coordinate's residual variance (at least ``min_variance``), so ``diag(C)`` equals the
        sample variance wherever that is above ``min_variance``.

        ``method="exact"`` takes the directions from a full SVD; ``"randomized"`` from a seeded randomized
        range finder (Halko et al., 2011: ``rank + 10`` columns, one power iteration, float32), 10–100× faster
        when ``rank`` is well below ``min(N, d)``; each direction's variance is then its Rayleigh quotient, and
        the diagonal still makes ``diag(C)`` the sample variance.

        Fit it on data the attacker could plausibly have (a calibration split), never on the samples whose
        risk is assessed.
        """
        samples = _check_samples("GaussianPrior.fit", samples)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"invdefend.prior.GaussianPrior.fit: rank={rank!r} must be an int >= 0")
        if not min_variance > 0:
            raise ValueError(f"invdefend.prior.GaussianPrior.fit: min_variance={min_variance} must be > 0")
        if method not in ("exact", "randomized"):
            raise ValueError(f"invdefend.prior.GaussianPrior.fit: method={method!r}; choose 'exact' or 'randomized'")
        X = samples.detach().reshape(samples.shape[0], -1)
        X = X.float() if method == "randomized" else X.double()  # the randomized fit works in float32
        n, d = X.shape
        mu = X.mean(dim=0)
        Xc = (X - mu) / math.sqrt(n - 1)
        r = min(rank, n - 1, d)
        total = Xc.pow(2).sum(dim=0)  # per-coordinate sample variance
        if r > 0:
            if method == "randomized" and r + 10 < min(n, d):
                Q, lam = _randomized_directions(Xc, r, seed)
            else:
                _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
                Q = Vh[:r].T.contiguous()
                lam = S[:r] ** 2
            Q, lam = Q.to(X.dtype), lam.to(X.dtype)
            explained = (Q**2 * lam).sum(dim=1)
        else:
            Q, lam, explained = X.new_zeros(d, 0), X.new_zeros(0), torch.zeros_like(total)
        diag = (total - explained).clamp_min(min_variance)
        dtype = samples.dtype
        return cls(mu.to(dtype), Q.to(dtype), lam.to(dtype), diag.to(dtype), tuple(samples.shape[1:]))

    @classmethod
    def from_loader(
        cls, loader: Iterable, rank: int = DEFAULT_RANK, *, max_samples: int | None = None, min_variance: float = 1e-6
    ) -> "GaussianPrior":
        """:meth:`fit` on the inputs of a loader yielding ``(inputs, targets)`` or ``inputs`` batches
        (at most ``max_samples`` of them)."""
        parts: list[Tensor] = []
        seen = 0
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_samples is not None:
                x = x[: max_samples - seen]
            parts.append(x.detach())
            seen += x.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
        if not parts:
            raise ValueError("invdefend.prior.GaussianPrior.from_loader: the loader yielded no samples")
        return cls.fit(torch.cat(parts), rank, min_variance=min_variance)

    @classmethod
    def iid(
        cls, sample_shape: Sequence[int], v0: float = 1 / 12, mean: float = 0.5, dtype: torch.dtype = torch.float32
    ) -> "GaussianPrior":
        """The i.i.d. prior ``N(mean·1, v0·I)`` (``v0 = 1/12``: uniform on [0, 1])."""
        if not (v0 > 0 and math.isfinite(v0)):
            raise ValueError(f"invdefend.prior.GaussianPrior.iid: v0={v0} must be finite and > 0")
        shape = tuple(int(s) for s in sample_shape)
        d = int(math.prod(shape))
        return cls(
            torch.full((d,), float(mean), dtype=dtype), torch.zeros(d, 0, dtype=dtype), torch.zeros(0, dtype=dtype),
            torch.full((d,), float(v0), dtype=dtype), shape,
        )

    @classmethod
    def from_covariance(
        cls, covariance: Tensor, mean: Tensor, sample_shape: Sequence[int], rank: int | None = None,
        min_variance: float = 1e-9,
    ) -> "GaussianPrior":
        """A prior from a covariance the user knows ``(d, d)``: its top-``rank`` eigen-directions (all by
        default) plus the residual diagonal (at least ``min_variance``)."""
        shape = tuple(int(s) for s in sample_shape)
        d = int(math.prod(shape))
        if covariance.shape != (d, d) or mean.reshape(-1).shape != (d,):
            raise ValueError(
                f"invdefend.prior.GaussianPrior.from_covariance: covariance {tuple(covariance.shape)} must be "
                f"({d}, {d}) and mean must have {d} entries for samples of shape {shape}"
            )
        C = 0.5 * (covariance + covariance.T).double()
        lam, Q = torch.linalg.eigh(C)
        lam, Q = lam.flip(0).clamp_min(0), Q.flip(1)
        r = d if rank is None else min(rank, d)
        diag = (C.diagonal() - (Q[:, :r] ** 2 * lam[:r]).sum(dim=1)).clamp_min(min_variance)
        dtype = covariance.dtype
        return cls(mean.reshape(-1).to(dtype), Q[:, :r].to(dtype), lam[:r].to(dtype), diag.to(dtype), shape)

    # -- what it is -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """``d``: coordinates of one sample."""
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """``r``: principal directions held."""
        return int(self.basis.shape[1])

    @property
    def trace(self) -> float:
        """``tr C``: the total prior variance (``d·v0`` for the i.i.d. prior)."""
        return float(self.diagonal.double().sum() + self.variances.double().sum())

    @property
    def mean_variance(self) -> float:
        """``tr C / d``: the InvLoss of a release that reveals nothing."""
        return self.trace / self.dim

    def coordinate_variances(self) -> Tensor:
        """``diag C`` ``(d,)``: each coordinate's prior variance."""
        return (self.basis.pow(2) * self.variances).sum(-1) + self.diagonal

    def covariance(self) -> Tensor:
        """The dense ``(d, d)`` covariance (small ``d`` only: tests and exact checks)."""
        return (self.basis * self.variances) @ self.basis.T + torch.diag(self.diagonal)

    def explained_fraction(self, directions: int) -> float:
        """Share of ``tr C`` held by the top ``directions`` eigen-directions of the low-rank part."""
        lam = self.variances.double().sort(descending=True).values
        return float(lam[:directions].sum() / self.trace)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "GaussianPrior":
        """The same prior in another dtype or on another device (itself when nothing changes: the square
        root's factors are not recomputed)."""
        if (dtype is None or dtype == self.mean.dtype) and (device is None or torch.device(device) == self.mean.device):
            return self
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return GaussianPrior(
            move(self.mean), move(self.basis), move(self.variances), move(self.diagonal), self.sample_shape
        )

    # -- the square root and the precision ------------------------------------------------------------
    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        P = self._P.to(like)  # type: ignore[attr-defined]
        return P, self._root_gain.to(like), self._inv_gain.to(like), self.diagonal.to(like)  # type: ignore[attr-defined]

    def sqrt_apply(self, z: Tensor) -> Tensor:
        """``A·z`` on the last dim (``A·Aᵀ = C``)."""
        P, gain, _, diag = self._factors(z)
        inner = z + ((z @ P) * gain) @ P.T
        return inner * diag.sqrt()

    def sqrt_t_apply(self, x: Tensor) -> Tensor:
        """``Aᵀ·x`` on the last dim."""
        P, gain, _, diag = self._factors(x)
        y = x * diag.sqrt()
        return y + ((y @ P) * gain) @ P.T

    def precision_apply(self, v: Tensor) -> Tensor:
        """``C⁻¹·v`` on the last dim (Woodbury)."""
        P, _, inv_gain, diag = self._factors(v)
        y = v / diag.sqrt()
        y = y + ((y @ P) * inv_gain) @ P.T
        return y / diag.sqrt()

    def whiten(self, x: Tensor) -> Tensor:
        """``z = A⁻¹(x − μ)`` for samples ``(B, *sample_shape)`` → ``(B, d)``."""
        P, gain, _, diag = self._factors(x)
        y = (x.reshape(x.shape[0], -1) - self.mean.to(x)) / diag.sqrt()
        return y + ((y @ P) * (1 / (1 + gain) - 1)) @ P.T

    def color(self, z: Tensor) -> Tensor:
        """``x = μ + A·z`` for ``z`` ``(B, d)`` → ``(B, *sample_shape)``."""
        return (self.mean.to(z) + self.sqrt_apply(z)).reshape(z.shape[0], *self.sample_shape)

    def neg_log_density(self, x: Tensor) -> Tensor:
        """``½ (x − μ)ᵀ C⁻¹ (x − μ)`` per sample ``(B,)`` (differentiable; up to a constant)."""
        diff = x.reshape(x.shape[0], -1) - self.mean.to(x)
        return 0.5 * (diff * self.precision_apply(diff)).sum(dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``(n, *sample_shape)``."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.color(z)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """A checkpointable dict."""
        return {"mean": self.mean, "basis": self.basis, "variances": self.variances, "diagonal": self.diagonal,
                "sample_shape": list(self.sample_shape)}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> "GaussianPrior":
        """Inverse of :meth:`state_dict`."""
        return cls(state["mean"], state["basis"], state["variances"], state["diagonal"],  # type: ignore[arg-type]
                   tuple(state["sample_shape"]))  # type: ignore[arg-type]


def _randomized_directions(Xc: Tensor, r: int, seed: int, power_iterations: int = 1) -> tuple[Tensor, Tensor]:
    """Top-``r`` right singular directions ``(d, r)`` of ``Xc`` and their variances ``‖Xc q‖²``, by a seeded
    randomized range finder (``r + 10`` columns, ``power_iterations`` power iterations) in float32."""
    n, d = Xc.shape
    A = Xc.float()
    omega = torch.randn(d, min(r + 10, n, d), generator=torch.Generator().manual_seed(seed))
    Y = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iterations):
        Y = torch.linalg.qr(A @ torch.linalg.qr(A.T @ Y).Q).Q
    B = Y.T @ A  # (q, d): A ≈ Y B, whose right singular vectors follow from the small q×q Gram matrix
    evals, U = torch.linalg.eigh((B @ B.T).double())
    top = torch.argsort(evals, descending=True)[:r]
    V = (B.T @ U[:, top].float()) / evals[top].clamp_min(1e-30).sqrt().float()
    Q = torch.linalg.qr(V).Q  # re-orthonormalised
    lam = (A @ Q).double().pow(2).sum(dim=0)
    order = torch.argsort(lam, descending=True)
    return Q[:, order].double().contiguous(), lam[order]


class OnlinePrior:
    """A :class:`GaussianPrior` tracked online from captured batches.

    Keeps a seeded uniform reservoir of at most ``capacity`` past samples and refits on demand, once
    ``refit_every`` (default: ``2·capacity``) reservoir entries changed since the last fit (every new sample
    writes one until the reservoir is full, then ever fewer: a sample enters with probability
    ``capacity / seen``, so ``2·capacity`` writes take a factor ``e² ≈ 7.4`` more samples seen, and refits
    thin out as training goes on; the data of a training run do not drift, so a prior refitted on more of them
    changes little), with the randomized fit (:meth:`GaussianPrior.fit`, ``method="randomized"``). A defense
    calls :meth:`prior` *before* :meth:`update` with the current batch, so a sample's own risk is never
    priced with a prior fitted on it. Until ``min_samples`` samples have been seen, :meth:`prior` returns
    ``None`` (the caller falls back to the i.i.d. prior).
    """

    def __init__(
        self, rank: int = DEFAULT_RANK, *, capacity: int = 1024, min_samples: int = 128, refit_every: int | None = None,
        seed: int = 0,
    ) -> None:
        refit_every = 2 * capacity if refit_every is None else refit_every
        if rank < 0 or capacity < 2 or min_samples < 2 or refit_every < 1:
            raise ValueError(
                f"invdefend.prior.OnlinePrior: rank={rank} must be >= 0, capacity={capacity} and "
                f"min_samples={min_samples} >= 2, refit_every={refit_every} >= 1"
            )
        if min_samples > capacity:
            raise ValueError(f"invdefend.prior.OnlinePrior: min_samples={min_samples} exceeds capacity={capacity}")
        self.rank, self.capacity, self.min_samples, self.refit_every = rank, capacity, min_samples, refit_every
        self.seen = 0
        self._buffer: Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self._fitted: GaussianPrior | None = None
        self._changed = 0  # reservoir entries written since the last fit
        self.fits = 0

    def update(self, inputs: Tensor) -> None:
        """Add a batch of samples ``(B, ...)`` to the reservoir (Algorithm R: every sample seen so far is in it
        with the same probability)."""
        x = inputs.detach().to("cpu")
        if x.dim() < 2:
            raise ValueError(f"invdefend.prior.OnlinePrior.update: expected a batch (B, ...), got shape {tuple(x.shape)}")
        if self._buffer is None:
            self._buffer = torch.empty(self.capacity, *x.shape[1:], dtype=x.dtype)
        elif x.shape[1:] != self._buffer.shape[1:]:
            raise ValueError(
                f"invdefend.prior.OnlinePrior.update: samples of shape {tuple(x.shape[1:])} after samples of shape "
                f"{tuple(self._buffer.shape[1:])}; use one OnlinePrior per input shape"
            )
        fill = min(max(self.capacity - self.seen, 0), x.shape[0])
        if fill:
            self._buffer[self.seen : self.seen + fill] = x[:fill]
        rest = x[fill:]
        if len(rest):  # Algorithm R, vectorised: sample t replaces slot j ~ U{0..t} when j < capacity
            seen = self.seen + fill + torch.arange(1, len(rest) + 1, dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self._gen, dtype=torch.float64) * seen).long()
            kept = torch.nonzero(slots < self.capacity).flatten()
            if len(kept):
                hit = slots[kept]
                # a slot hit twice in this batch keeps the later sample, as one-by-one replacement would
                last = torch.zeros(self.capacity, dtype=torch.long).scatter_reduce_(
                    0, hit, torch.arange(len(hit)), reduce="amax", include_self=False)
                final = last[hit] == torch.arange(len(hit))
                self._buffer[hit[final]] = rest[kept[final]]
                self._changed += len(kept)
        self._changed += fill
        self.seen += x.shape[0]

    @property
    def stored(self) -> int:
        """Samples held in the reservoir."""
        return min(self.seen, self.capacity)

    def prior(self) -> GaussianPrior | None:
        """The prior fitted on the reservoir (refitted once ``refit_every`` of its entries changed), or ``None``
        before ``min_samples`` samples were seen."""
        if self._buffer is None or self.seen < self.min_samples:
            return None
        if self._fitted is None or self._changed >= self.refit_every:
            held = self._buffer[: self.stored].float()
            self._fitted = GaussianPrior.fit(held, min(self.rank, held.shape[0] - 1), method="randomized",
                                             seed=self.fits)
            self._changed = 0
            self.fits += 1
        return self._fitted
