"""The Jacobian in prior-whitened coordinates, ``J̃ = J·A`` with ``A·Aᵀ = C`` (THEORY §7).

Substituting ``x = μ + A·z`` with ``z ~ N(0, I)`` turns InvLoss under the Gaussian prior ``N(μ, C)`` into
the i.i.d. problem (``v0 = 1``) for ``J̃``, with the error measured in the metric ``C``. Every spectral tool
(exact SVD, top-k block Krylov, its warm start, the Lanczos quadrature) works on :class:`WhitenedOperator`
unchanged: a product with ``J̃`` is one product with ``A`` and one with ``J``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .jacobian import JacobianOperator
from .prior import GaussianPrior

__all__ = ["WhitenedOperator"]


class WhitenedOperator:
    """``J̃ = J·A`` for a batch: the same interface as :class:`~invdefend.jacobian.JacobianOperator`.

    Args:
        op: the Jacobian ``J`` of the shared quantity with respect to the input.
        prior: the data prior; its sample shape must match the operator's inputs.
    """

    def __init__(self, op: JacobianOperator, prior: GaussianPrior) -> None:
        if prior.dim != op.in_dim:
            raise ValueError(
                f"invdefend.whitened: the prior is over samples of shape {prior.sample_shape} ({prior.dim} "
                f"coordinates) but the inputs have {op.in_dim} coordinates {op.sample_shape}; fit the prior on "
                "inputs of the same shape"
            )
        self.op = op
        self.prior = prior.to(dtype=op.dtype, device=op.device)
        self.batch_size, self.in_dim, self.out_dim = op.batch_size, op.in_dim, op.out_dim
        self.dtype, self.device, self.name = op.dtype, op.device, f"whitened {op.name}"
        self.inputs = op.inputs

    def apply_root(self, Z: Tensor) -> Tensor:
        """``A·Z`` for blocks ``(B, d, b)``."""
        return self.prior.sqrt_apply(Z.transpose(1, 2)).transpose(1, 2)

    def apply_root_t(self, X: Tensor) -> Tensor:
        """``Aᵀ·X`` for blocks ``(B, d, b)``."""
        return self.prior.sqrt_t_apply(X.transpose(1, 2)).transpose(1, 2)

    def matvec(self, V: Tensor) -> Tensor:
        """``J̃ V = J (A V)``: ``(B, d, b) -> (B, m, b)``."""
        return self.op.matvec(self.apply_root(V.to(self.dtype)))

    def rmatvec(self, U: Tensor) -> Tensor:
        """``J̃ᵀ U = Aᵀ (Jᵀ U)``: ``(B, m, b) -> (B, d, b)``."""
        return self.apply_root_t(self.op.rmatvec(U))

    def gram_matvec(self, V: Tensor) -> Tensor:
        """``J̃ᵀJ̃ V = Aᵀ JᵀJ (A V)``, memory-lean (:meth:`JacobianOperator.gram_matvec`)."""
        return self.apply_root_t(self.op.gram_matvec(self.apply_root(V.to(self.dtype))))

    def values(self) -> Tensor:
        """``F(x)`` (whitening changes the coordinates of the input, not the shared quantity)."""
        return self.op.values()

    def dense(self, chunk: int = 256) -> Tensor:
        """``J̃`` as a dense ``(B, m, d)`` tensor (small problems)."""
        return self.prior.sqrt_t_apply(self.op.dense(chunk=chunk))

    def prior_weights(self, right_vectors: Tensor) -> Tensor:
        """``‖A v_i‖²`` ``(B, k)`` of whitened right singular vectors ``(B, d, k)``: how much pixel-space
        variance each direction carries."""
        return self.apply_root(right_vectors.to(self.dtype)).pow(2).sum(dim=1)

    def subset(self, index: Tensor | list[int]) -> "WhitenedOperator":
        """The same operator for some samples of the batch."""
        return WhitenedOperator(self.op.subset(index), self.prior)

    def __repr__(self) -> str:
        return f"WhitenedOperator({self.op!r}, prior rank {self.prior.rank})"
