"""Many independent gradient releases attacked at once: Inverting Gradients and the prior-aware MAP attack,
vectorised over releases.

An audit attacks dozens of releases of one model (samples × noise levels). Attacking them one by one pays
the per-step overhead of a batch-of-one double backward every time; here the per-release gradients are
computed with ``torch.func.vmap`` and every release's reconstruction takes its own optimiser step in one
pass (the objectives are independent sums, so each release's iterate is exactly what a separate run from the
same start would produce with Adam). About 25× faster per release on LeNet at 32×32×3 than the one-at-a-time
attacks of :mod:`invdefend.attacks.inverting_gradients` and :mod:`invdefend.attacks.defense_aware`.

Objectives (per release ``r`` with ``B`` samples, target ``t_r``, known labels):

* ``"cosine"`` — Inverting Gradients (Geiping et al., 2020): ``1 − cos(g(x), t_r) + α_TV·TV(x)``, signed
  Adam steps, step decay at 3/8, 5/8, 7/8, projection on ``[0, 1]``. Threat model: an honest-but-curious
  server that knows the weights and labels and matches the *direction* of the shared gradient; it ignores any
  noise.
* ``"map"`` — the defense-aware MAP attack: ``½‖g(x) − t_r‖²/σ_r² + Σ_b ½(x_b − μ)ᵀC⁻¹(x_b − μ) +
  α_TV·TV(x)``. Threat model: it also knows the isotropic noise variance ``σ_r²`` the defense adds and the
  image prior ``N(μ, C)`` (a :class:`~invdefend.prior.GaussianPrior` fitted on data it could have). With a
  prior it optimises the whitened coordinates ``z`` (``x = μ + A z``, so the prior term is ``½‖z‖²``) with
  L-BFGS from ``z = 0`` (the prior mean), then clamps to ``[0, 1]``: on LeNet at 32×32×3 this reaches 20–26 dB
  at noise energy 0.1 where Adam on the pixels stays near the prior mean (10–14 dB) after 1000 steps.
  Without a prior it runs Adam on the pixels from uniform noise.

Restarts: each release keeps the restart with the lowest final objective (the attacker cannot see the
original).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..prior import GaussianPrior
from ._common import LossFn, check_positive, make_generator

__all__ = ["BatchedAttackResult", "batched_gradient_attack", "release_gradients"]

Objective = Literal["cosine", "map"]


@dataclass
class BatchedAttackResult:
    """Reconstructions ``(N, B, ...)`` of ``N`` releases, each release's final objective ``(N,)`` (of the
    kept restart), every restart's final objectives ``(restarts, N)`` and the wall time."""

    reconstructions: Tensor
    final_losses: Tensor
    restart_losses: Tensor
    seconds: float


def _release_fn(model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], buffers: dict[str, Tensor]):
    def release(x: Tensor, y: Tensor) -> Tensor:
        def loss(p: dict[str, Tensor]) -> Tensor:
            return loss_fn(functional_call(model, {**p, **buffers}, (x,)), y)

        return torch.cat([g.reshape(-1) for g in grad(loss)(params).values()])

    return release


def release_gradients(
    model: nn.Module, inputs: Tensor, labels: Tensor, *, loss_fn: LossFn = F.cross_entropy
) -> Tensor:
    """The flat batch-mean gradient of each release: ``inputs`` ``(N, B, ...)``, ``labels`` ``(N, B)`` →
    ``(N, m)`` (model in eval mode, its trainable parameters only)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    was_training = model.training
    model.eval()
    try:
        return vmap(_release_fn(model, loss_fn, params, buffers))(inputs, labels).detach()
    finally:
        model.train(was_training)


def _tv(x: Tensor) -> Tensor:
    """Per-release total variation ``(N,)`` of ``(N, B, C, H, W)``: mean |neighbour difference|, summed over B."""
    if x.dim() != 5:
        return x.new_zeros(x.shape[0])
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(2).mean(-1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(2).mean(-1)
    return (dh + dw).sum(-1)


def batched_gradient_attack(
    model: nn.Module,
    releases: Tensor,
    labels: Tensor,
    *,
    sample_shape: Sequence[int],
    objective: Objective = "cosine",
    noise_variance: Tensor | float | None = None,
    prior: GaussianPrior | None = None,
    tv_weight: float = 1e-2,
    iterations: int = 4000,
    lr: float | None = None,
    restarts: int = 1,
    loss_fn: LossFn = F.cross_entropy,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> BatchedAttackResult:
    """Attack ``N`` independent releases of one model at once.

    Args:
        model: the victim (not modified; evaluated in eval mode).
        releases: ``(N, m)`` shared batch-mean gradients (flat, trainable parameters in order).
        labels: ``(N, B)`` the labels of every release's batch (known to the attacker).
        sample_shape: shape of one sample, e.g. ``(3, 32, 32)``.
        objective: ``"cosine"`` (Inverting Gradients) or ``"map"`` (defense-aware MAP; module docstring).
        noise_variance: ``"map"`` only: isotropic noise variance per coordinate of each release (scalar or
            ``(N,)``, > 0; for an undefended release pass a tiny variance, e.g. ``1e-10·‖t‖²/m``).
        prior: ``"map"`` only: the image prior ``N(μ, C)``; None drops the Gaussian term.
        tv_weight: ``α_TV`` (per-sample TV is a mean over its pixels).
        iterations: optimiser steps per restart.
        lr: Adam step (default 0.1 for cosine, 0.02 for map), decayed ×0.1 at 3/8, 5/8, 7/8 of the run.
        restarts: independent starts per release; the lowest final objective is kept.
        loss_fn, seed, generator: the training loss; the random starts' source.
        init: optional ``(N, B, ...)`` start of restart 0 (for example another attack's reconstructions: the
            attacker chains attacks); the other restarts start as usual.
    """
    where = "attacks.batched_gradient_attack"
    if objective not in ("cosine", "map"):
        raise ValueError(f"invdefend.{where}: objective={objective!r}; choose 'cosine' or 'map'")
    if releases.dim() != 2 or labels.dim() != 2 or labels.shape[0] != releases.shape[0]:
        raise ValueError(
            f"invdefend.{where}: releases must be (N, m) and labels (N, B) with the same N; got "
            f"{tuple(releases.shape)} and {tuple(labels.shape)}"
        )
    lr = (0.1 if objective == "cosine" else 0.02) if lr is None else lr
    check_positive(where, iterations=iterations, lr=lr, restarts=restarts)
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    N, B = labels.shape
    shape = tuple(int(s) for s in sample_shape)
    dtype = releases.dtype
    params = {k: v.detach().to(dtype) for k, v in model.named_parameters() if v.requires_grad}
    if sum(p.numel() for p in params.values()) != releases.shape[1]:
        raise ValueError(
            f"invdefend.{where}: releases have {releases.shape[1]} coordinates but the model has "
            f"{sum(p.numel() for p in params.values())} trainable parameters"
        )
    sigma2: Tensor | None = None
    if objective == "map":
        if noise_variance is None:
            raise ValueError(f"invdefend.{where}: objective='map' needs noise_variance= (the defense's noise law)")
        sigma2 = torch.as_tensor(noise_variance, dtype=dtype).expand(N).clone()
        if not bool((sigma2 > 0).all()) or not bool(torch.isfinite(sigma2).all()):
            raise ValueError(f"invdefend.{where}: noise_variance must be finite and > 0 for every release")
        if prior is not None and prior.sample_shape != shape:
            raise ValueError(
                f"invdefend.{where}: the prior is over samples of shape {prior.sample_shape}, the attack over {shape}"
            )
    elif prior is not None or noise_variance is not None:
        raise ValueError(f"invdefend.{where}: prior= and noise_variance= are for objective='map' only")
    if init is not None:
        if tuple(init.shape) != (N, B, *shape):
            raise ValueError(
                f"invdefend.{where}: init must have shape {(N, B, *shape)} (releases, batch, sample); got "
                f"{tuple(init.shape)}"
            )
        if not bool(torch.isfinite(init).all()):
            raise ValueError(f"invdefend.{where}: init has non-finite entries")
        init = init.detach().to(dtype)
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    release = vmap(_release_fn(model, loss_fn, params, buffers))
    gen = make_generator(generator, seed, where)
    pri = None if prior is None else prior.to(dtype=dtype)
    target = releases.detach()
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]

    def per_release(x: Tensor) -> Tensor:
        g = release(x, labels)
        if objective == "cosine":
            loss = 1.0 - F.cosine_similarity(g, target, dim=-1, eps=1e-12)
        else:
            assert sigma2 is not None
            loss = 0.5 * (g - target).pow(2).sum(-1) / sigma2
            if pri is not None:
                loss = loss + pri.neg_log_density(x.reshape(N * B, *shape)).reshape(N, B).sum(-1)
        if tv_weight > 0:
            loss = loss + tv_weight * _tv(x)
        return loss

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    if objective == "map" and pri is not None:
        try:
            return _whitened_map(per_release, pri, N, B, shape, iterations, restarts, gen, dtype, t0, init)
        finally:
            model.train(was_training)
    best_x: Tensor | None = None
    best_loss = torch.full((N,), math.inf, dtype=dtype)
    finals = []
    try:
        for r in range(restarts):
            if r == 0 and init is not None:
                x0 = init.clone()
            else:
                x0 = torch.rand((N, B, *shape), generator=gen, dtype=dtype)
            x = x0.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for _ in range(iterations):
                opt.zero_grad()
                per_release(x).sum().backward()
                if objective == "cosine":
                    x.grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
            with torch.no_grad():
                final = per_release(x).detach()
            final = torch.where(torch.isfinite(final), final, torch.full_like(final, math.inf))
            finals.append(final)
            better = final < best_loss
            best_x = x.detach().clone() if best_x is None else torch.where(
                better.view(N, *([1] * (x.dim() - 1))), x.detach(), best_x
            )
            best_loss = torch.where(better, final, best_loss)
    finally:
        model.train(was_training)
    assert best_x is not None
    return BatchedAttackResult(best_x, best_loss, torch.stack(finals), time.perf_counter() - t0)


def _whitened_map(
    per_release, prior: GaussianPrior, N: int, B: int, shape: tuple[int, ...], iterations: int, restarts: int,
    gen: torch.Generator, dtype: torch.dtype, t0: float, init: Tensor | None = None,
) -> BatchedAttackResult:
    """The MAP objective over whitened coordinates with L-BFGS (restart 0 from ``init`` or else the prior mean,
    the others from ``z ~ N(0, 0.25·I)``); the kept iterate is clamped to ``[0, 1]``. Each release's objective
    is divided by its value at the start (same minimiser) so that one joint line search serves releases of very
    different scales; a release whose iterate diverges (non-finite) falls back to its start. Group releases of
    similar noise levels in one call: L-BFGS's shared curvature model still favours the stiffest problems.

    L-BFGS stops early when its curvature pairs stop giving a descent direction, which happens at the kinks of
    ReLU networks' gradients; the run then continues from where it stopped with a fresh history until
    ``iterations`` are spent or a fresh start makes no progress."""
    d = prior.dim

    def x_of(z: Tensor) -> Tensor:
        return prior.color(z.reshape(N * B, d)).reshape(N, B, *shape)

    best_x: Tensor | None = None
    best_loss = torch.full((N,), math.inf, dtype=dtype)
    finals = []
    for r in range(restarts):
        if r == 0:
            z0 = (torch.zeros(N * B, d, dtype=dtype) if init is None
                  else prior.whiten(init.reshape(N * B, *shape)).to(dtype))
        else:
            z0 = 0.5 * torch.randn(N * B, d, generator=gen, dtype=dtype)
        z = z0.clone().requires_grad_(True)

        with torch.no_grad():  # each release's objective in units of its value at the start: the argmin is
            scale = per_release(x_of(z0)).detach().abs().clamp_min(1e-30)  # unchanged, the line search balanced

        spent = 0
        while spent < iterations:
            opt = torch.optim.LBFGS([z], lr=1.0, max_iter=iterations - spent, history_size=50,
                                    line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

            def closure(opt: torch.optim.LBFGS = opt, z: Tensor = z, scale: Tensor = scale) -> Tensor:
                opt.zero_grad()
                loss = (per_release(x_of(z)) / scale).sum()
                loss.backward()
                return loss

            opt.step(closure)
            steps = int(opt.state[z].get("n_iter", 0))
            spent += max(steps, 1)
            if steps <= 1 or not bool(torch.isfinite(z).all()):
                break  # a fresh history made no progress (or diverged): stop here
        with torch.no_grad():
            zz = z.detach()
            bad = ~torch.isfinite(zz).reshape(N, -1).all(dim=1)  # a diverged release: back to its start
            zz = torch.where(bad.repeat_interleave(B).unsqueeze(1), z0.detach(), zz)
            x = x_of(zz).clamp(0.0, 1.0)
            final = per_release(x_of(zz)).detach()
        final = torch.where(torch.isfinite(final) & ~bad, final, torch.full_like(final, math.inf))
        finals.append(final)
        better = final < best_loss
        best_x = x if best_x is None else torch.where(better.view(N, *([1] * (x.dim() - 1))), x, best_x)
        best_loss = torch.where(better, final, best_loss)
    assert best_x is not None
    return BatchedAttackResult(best_x, best_loss, torch.stack(finals), time.perf_counter() - t0)
