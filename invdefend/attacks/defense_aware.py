"""A defense-aware attacker: it knows the Gaussian noise the defense adds and whitens its objective by it.

The defense releases ``s̃ = F(x) + ε`` with ``ε ~ N(0, Σ)`` and ``Σ = σ²_iso·I + U diag(τ) Uᵀ``
(``U``: ``(m, r)``, ``τ ≥ 0``: ``(r,)``). From ``n`` independent releases of the same ``F(x)`` the attacker
forms their mean (covariance ``Σ/n``) and computes the MAP estimate under a Gaussian (and optional TV)
prior,

    min_x  ½ (s̄ − F(x))ᵀ (Σ/n)⁻¹ (s̄ − F(x))  +  ½ ‖x − μ‖² / v0  +  α_TV · TV(x),

the maximum-a-posteriori attacker of InvLoss (THEORY §2) without the linearisation. ``Σ⁻¹`` is applied
without ever forming an ``m × m`` matrix (:class:`NoiseCovariance`). ``F`` is the per-batch gradient
(:func:`defense_aware_gradient_attack`) or the embedding (:func:`defense_aware_embedding_attack`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..noise_law import NoiseCovariance
from ._common import (
    AttackResult,
    FunctionalModel,
    LossFn,
    Mode,
    Timer,
    as_flat_gradient,
    check_input_shape,
    check_positive,
    make_generator,
    minimize_lbfgs,
    projected_adam,
    total_variation,
)
from .dlg import check_labels, random_start

__all__ = ["NoiseCovariance", "defense_aware_gradient_attack", "defense_aware_embedding_attack", "mean_release"]


def mean_release(
    releases: Tensor | Sequence[Tensor], noise: NoiseCovariance, per_release_dim: int
) -> tuple[Tensor, NoiseCovariance, int]:
    """Average ``n`` independent releases: ``(mean, Σ/n, n)``.

    ``releases`` is one release (a tensor with ``per_release_dim`` dims), a stack with one more leading
    dim, or a sequence of releases.
    """
    if isinstance(releases, Tensor):
        stack = releases.unsqueeze(0) if releases.dim() == per_release_dim else releases
    else:
        items = list(releases)
        if not items:
            raise ValueError("invdefend.attacks.mean_release: got an empty list of releases")
        stack = torch.stack([r.detach() for r in items])
    if stack.dim() != per_release_dim + 1:
        raise ValueError(
            f"invdefend.attacks.mean_release: each release must have {per_release_dim} dims, got a stack of "
            f"shape {tuple(stack.shape)}"
        )
    n = stack.shape[0]
    return stack.detach().mean(dim=0), noise.scaled(1.0 / n), n


def _map_attack(
    forward: Callable[[Tensor], Tensor],
    target: Tensor,
    noise: NoiseCovariance,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    iterations: int,
    lr: float | None,
    optimizer: str,
    tv_weight: float,
    prior_mean: float | Tensor | None,
    prior_var: float | None,
    init: str,
    gen: torch.Generator,
    where: str,
) -> tuple[Tensor, list[float]]:
    """Minimise the whitened MAP objective; returns the (clamped) reconstruction and the loss history."""
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"invdefend.{where}: optimizer={optimizer!r}; choose 'lbfgs' or 'adam'")
    lr = (1.0 if optimizer == "lbfgs" else 0.05) if lr is None else lr
    check_positive(where, iterations=iterations, lr=lr)
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    if prior_var is not None and not prior_var > 0:
        raise ValueError(f"invdefend.{where}: prior_var={prior_var} must be > 0, or None for no Gaussian prior")
    eig = noise.eigenbasis(dtype)
    mu = None if prior_mean is None else torch.as_tensor(prior_mean, dtype=dtype)

    def objective(x: Tensor) -> Tensor:
        loss = 0.5 * noise.mahalanobis(forward(x) - target, _eig=eig).sum()
        if prior_var is not None and mu is not None:
            loss = loss + 0.5 * (x - mu).pow(2).sum() / prior_var
        if tv_weight > 0:
            loss = loss + tv_weight * total_variation(x)
        return loss

    x = random_start(shape, gen, dtype, init, where).requires_grad_(True)
    history: list[float] = []
    if optimizer == "lbfgs":
        minimize_lbfgs([x], lambda: objective(x), iterations, history, lr=lr)
    else:
        projected_adam(x, objective, iterations, history, lr=lr)
    return x.detach().clamp(0.0, 1.0), history


def defense_aware_gradient_attack(
    model: nn.Module,
    releases: Tensor | Sequence[Tensor],
    *,
    noise: NoiseCovariance,
    input_shape: Sequence[int],
    labels: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    iterations: int = 500,
    lr: float | None = None,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
    prior_mean: float | Tensor | None = 0.5,
    prior_var: float | None = 1.0 / 12.0,
    tv_weight: float = 0.0,
    init: str = "uniform",
    dtype: torch.dtype | None = torch.float64,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """MAP reconstruction from noisy shared gradients, whitened by the known noise covariance.

    Threat model: the server knows the model weights, the loss, the labels, the batch shape **and the
    defense's noise distribution** ``N(0, Σ)`` (the defense is public, Kerckhoffs' principle), and receives
    one or several independent noisy releases ``g̃_k = g(x) + ε_k`` of the same batch's mean gradient.

    Args:
        model: the victim model (not modified).
        releases: one release (flat ``(m,)``), a stack ``(n, m)``, or a sequence of releases, each flat or a
            list of per-parameter tensors.
        noise: the per-release noise covariance ``Σ`` (``basis`` shaped ``(m, r)``).
        input_shape: shape of the attacked batch.
        labels: known labels ``(B,)``.
        loss_fn: ``loss_fn(logits, labels) -> scalar mean loss``.
        iterations: L-BFGS iterations (chunks of 20) or Adam steps.
        lr: step size (default 1 for L-BFGS, 0.05 for Adam).
        optimizer: ``"lbfgs"`` (unconstrained, output clamped to [0, 1]) or ``"adam"`` (clamped each step).
        prior_mean, prior_var: Gaussian prior ``N(μ, v0 I)`` on the pixels (default: mean 0.5, variance 1/12,
            i.e. uniform pixels in [0, 1]); ``prior_var=None`` disables it.
        tv_weight: weight of a total-variation prior.
        init: random start, ``"uniform"``, ``"normal"`` or ``"gray"``.
        dtype: working dtype (float64 by default: ``Σ⁻¹`` can be badly conditioned).
        mode: evaluate the model in ``"eval"`` or ``"train"`` mode.
        generator, seed: source of the random start (default ``seed=0``).

    Returns:
        :class:`AttackResult`; ``info["releases"]`` is the number of releases averaged.
    """
    where = "attacks.defense_aware_gradient_attack"
    shape = check_input_shape(input_shape, where)
    labels = check_labels(labels, shape[0], where)
    with Timer() as timer:
        fm = FunctionalModel(model, dtype=dtype, mode=mode, where=where)
        flat = _flatten_releases(releases, model, where)
        if noise.dim is not None and noise.dim != flat.shape[1]:
            raise ValueError(
                f"invdefend.{where}: noise basis has m={noise.dim} rows but the gradient has {flat.shape[1]} entries"
            )
        if noise.basis is not None and noise.basis.dim() != 2:
            raise ValueError(f"invdefend.{where}: a shared gradient has one noise basis; pass basis shaped (m, r)")
        target, cov, n = mean_release(flat, noise, 1)
        rec, history = _map_attack(
            lambda x: fm.gradient(x, labels, loss_fn, create_graph=True),
            target.to(fm.dtype), cov, shape=shape, dtype=fm.dtype, iterations=iterations, lr=lr,
            optimizer=optimizer, tv_weight=tv_weight, prior_mean=prior_mean, prior_var=prior_var, init=init,
            gen=make_generator(generator, seed, where), where=where,
        )
    return AttackResult(rec, labels, history, "defense_aware_gradient", timer.seconds, {"releases": n})


def _flatten_releases(releases: Tensor | Sequence[Tensor], model: nn.Module, where: str) -> Tensor:
    """Releases as a stack ``(n, m)``; accepts (m,), (n, m), a list of flat releases or of per-parameter lists."""
    if isinstance(releases, Tensor):
        if releases.dim() == 1:
            return as_flat_gradient(releases, model, where).unsqueeze(0)
        if releases.dim() == 2:
            return torch.stack([as_flat_gradient(r, model, where) for r in releases])
        raise ValueError(f"invdefend.{where}: releases tensor must be (m,) or (n, m), got {tuple(releases.shape)}")
    items = list(releases)
    if not items:
        raise ValueError(f"invdefend.{where}: got an empty list of releases")
    m = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if all(isinstance(r, Tensor) and r.dim() == 1 and r.numel() == m for r in items):
        return torch.stack([r.detach() for r in items])
    if all(isinstance(r, (list, tuple)) for r in items):
        return torch.stack([as_flat_gradient(r, model, where) for r in items])
    return as_flat_gradient(items, model, where).unsqueeze(0)  # one release as a per-parameter list


def defense_aware_embedding_attack(
    bottom: nn.Module,
    releases: Tensor | Sequence[Tensor],
    *,
    noise: NoiseCovariance,
    input_shape: Sequence[int],
    iterations: int = 500,
    lr: float | None = None,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
    prior_mean: float | Tensor | None = 0.5,
    prior_var: float | None = 1.0 / 12.0,
    tv_weight: float = 0.0,
    init: str = "uniform",
    dtype: torch.dtype | None = torch.float64,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """MAP reconstruction from noisy embeddings, whitened by the known per-sample noise covariance.

    Threat model: the split-learning server knows the client's bottom model (architecture and weights), the
    input shape **and the defense's noise distribution** (one ``Σ`` for all samples, ``basis (m, r)``, or
    one per sample, ``basis (B, m, r)``), and observes one or several independent noisy releases
    ``h̃_k = h(x) + ε_k`` of the batch's embeddings.

    Args:
        bottom: the client's bottom model ``(B, ...) -> (B, m)`` (not modified).
        releases: one release ``(B, m)``, a stack ``(n, B, m)`` or a sequence of ``(B, m)`` releases.
        noise, input_shape, iterations, lr, optimizer, prior_mean, prior_var, tv_weight, init, dtype, mode,
            generator, seed: as in :func:`defense_aware_gradient_attack`.

    Returns:
        :class:`AttackResult` (``label`` is ``None``).
    """
    where = "attacks.defense_aware_embedding_attack"
    shape = check_input_shape(input_shape, where)
    with Timer() as timer:
        fm = FunctionalModel(bottom, dtype=dtype, mode=mode, where=where)
        target, cov, n = mean_release(releases, noise, 2)
        if target.shape[0] != shape[0]:
            raise ValueError(
                f"invdefend.{where}: releases hold {target.shape[0]} samples but input_shape has batch {shape[0]}"
            )
        if noise.dim is not None and noise.dim != target.shape[1]:
            raise ValueError(
                f"invdefend.{where}: noise basis has m={noise.dim} rows but embeddings have {target.shape[1]}"
            )
        if noise.basis is not None and noise.basis.dim() == 3 and noise.basis.shape[0] != shape[0]:
            raise ValueError(
                f"invdefend.{where}: per-sample noise basis has {noise.basis.shape[0]} samples, batch is {shape[0]}"
            )
        rec, history = _map_attack(
            lambda x: fm(x).reshape(shape[0], -1),
            target.to(fm.dtype), cov, shape=shape, dtype=fm.dtype, iterations=iterations, lr=lr,
            optimizer=optimizer, tv_weight=tv_weight, prior_mean=prior_mean, prior_var=prior_var, init=init,
            gen=make_generator(generator, seed, where), where=where,
        )
    return AttackResult(rec, None, history, "defense_aware_embedding", timer.seconds, {"releases": n})
