"""The local-update attacker: one reconstruction from a FedAvg client's update after several local steps.

A FedAvg client does not send a gradient: it trains ``E`` local steps from the global weights ``θ_0`` and sends
``Δ = θ_E − θ_0``. With the gradient defense on, every local step released ``g̃_t = g(x; θ_t) + ε_t`` into the
client's own optimizer, and ``Δ = −lr·Σ_t g̃_t`` (plain SGD) is computed from those releases only: a
post-processing of them. So the update carries no more about ``x`` than the ``E`` releases together, and its
Bayes error is at least theirs (the data-processing inequality). The multi-release attacker
(:func:`~invdefend.attacks.multi_release_gradient_attack`) sees the releases; this one sees the update only.
``docs/theory.md`` §10.5 states the bound; ``tests/attacks/test_attack_local_update.py`` checks it.

Threat model: the server, which sent ``θ_0`` and knows the client's schedule (``steps`` plain SGD steps of
step size ``lr`` on one fixed batch, the local-update setting of Inverting Gradients, Geiping et al. 2020),
the loss, the labels, the batch shape and the noise's total variance per coordinate. It minimises

    ½‖Δ − Δ̂(x)‖² / v_Δ  +  ½‖x − μ‖²/v0  (or a data prior's negative log-density)

where ``Δ̂(x)`` re-runs the ``steps`` noise-free local steps from ``θ_0`` (differentiably) and ``v_Δ`` is the
update's noise variance per coordinate (``lr²·Σ_t σ_t²``; a tiny floor relative to ``‖Δ‖²`` when there is
no noise), by L-BFGS in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._common import (
    IID_PRIOR_MEAN,
    IID_PRIOR_VAR,
    AttackResult,
    LossFn,
    Timer,
    check_input_shape,
    check_positive,
    trainable_named_parameters,
)

__all__ = ["local_update_attack", "simulate_local_update"]


def simulate_local_update(
    model: nn.Module, inputs: Tensor, labels: Tensor, *, steps: int, lr: float, loss_fn: LossFn = F.cross_entropy,
    create_graph: bool = False,
) -> Tensor:
    """``θ_E − θ_0`` (flat, trainable-parameter order) after ``steps`` plain SGD steps of size ``lr`` on
    ``(inputs, labels)`` from the model's current weights, without touching the model. With
    ``create_graph`` the result is differentiable with respect to ``inputs``."""
    named = trainable_named_parameters(model, "attacks.simulate_local_update")
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    start = {n: p.detach().to(inputs.dtype).clone().requires_grad_(True) for n, p in named}
    theta = dict(start)
    for _ in range(int(steps)):
        out = functional_call(model, {**theta, **frozen, **buffers}, (inputs,))
        grads = torch.autograd.grad(loss_fn(out, labels), list(theta.values()), create_graph=True)
        theta = {n: theta[n] - lr * g for n, g in zip(theta, grads)}
    delta = torch.cat([(theta[n] - start[n]).reshape(-1) for n in theta])
    return delta if create_graph else delta.detach()


def local_update_attack(
    model: nn.Module,
    update: Tensor | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    labels: Tensor,
    steps: int,
    lr: float,
    noise_variance: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    iterations: int = 600,
    prior: Any | None = None,
    prior_mean: float = IID_PRIOR_MEAN,
    prior_var: float = IID_PRIOR_VAR,
    seed: int | None = None,
) -> AttackResult:
    """MAP reconstruction of a client's batch from its FedAvg update ``Δ = θ_E − θ_0``.

    Args:
        model: the global model the client started from (weights ``θ_0``); not modified.
        update: ``θ_E − θ_0``, flat ``(m,)`` in trainable-parameter order or a list of per-parameter tensors.
        input_shape: the batch's shape, e.g. ``(1, 3, 32, 32)``.
        labels: the batch's labels (known to the server, as in the other gradient attacks).
        steps, lr: the client's schedule: ``steps`` plain SGD steps of size ``lr`` on the batch.
        noise_variance: the update's noise variance per coordinate (``lr²·Σ_t σ_t²`` for isotropic noise of
            variance ``σ_t²`` at step ``t``); 0 for an undefended client.
        loss_fn: the training loss (mean reduction).
        iterations: L-BFGS iterations (chunks of 20).
        prior: an object with ``neg_log_density(x)`` (e.g. a fitted :class:`~invdefend.prior.GaussianPrior`)
            replacing the i.i.d. pixel prior ``N(prior_mean, prior_var)``.
        seed: the random start's seed (uniform in [0, 1]).
    """
    shape = check_input_shape(input_shape, "attacks.local_update_attack")
    check_positive("attacks.local_update_attack", steps=steps, lr=lr, iterations=iterations)
    if not math.isfinite(noise_variance) or noise_variance < 0:
        raise ValueError(f"invdefend.attacks.local_update_attack: noise_variance={noise_variance!r} must be >= 0")
    with Timer() as timer:
        result = _attack(model, update, shape, labels, steps, lr, noise_variance, loss_fn, iterations, prior,
                         prior_mean, prior_var, seed)
    result.seconds = timer.seconds
    return result


def _attack(model: nn.Module, update: Tensor | Sequence[Tensor], shape: tuple[int, ...], labels: Tensor, steps: int,
            lr: float, noise_variance: float, loss_fn: LossFn, iterations: int, prior: Any | None, prior_mean: float,
            prior_var: float, seed: int | None) -> AttackResult:
    target = (torch.cat([u.detach().reshape(-1) for u in update]) if not isinstance(update, Tensor)
              else update.detach().reshape(-1)).double()
    m = sum(p.numel() for _, p in trainable_named_parameters(model, "attacks.local_update_attack"))
    if target.numel() != m:
        raise ValueError(f"invdefend.attacks.local_update_attack: the update has {target.numel()} entries but the "
                         f"model {m} trainable parameters")
    variance = max(float(noise_variance), 1e-12 * float(target.pow(2).sum()) / m, 1e-300)
    work = _float64_copy(model)
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    x = torch.rand(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = labels.detach()
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16)
    history: list[float] = []

    def objective() -> Tensor:
        opt.zero_grad()
        residual = simulate_local_update(work, x, y, steps=steps, lr=lr, loss_fn=loss_fn, create_graph=True) - target
        value = 0.5 * residual.pow(2).sum() / variance
        if prior is not None:
            value = value + prior.neg_log_density(x).sum()
        else:
            value = value + 0.5 * (x - prior_mean).pow(2).sum() / prior_var
        value.backward()
        return value

    for _ in range(max(1, int(iterations) // 20)):
        loss = opt.step(objective)
        history.append(float(loss.detach()))
        if not math.isfinite(history[-1]):
            break
    return AttackResult(
        reconstruction=x.detach().clamp(0.0, 1.0).to(labels.device),
        label=y.to(torch.int64),
        loss_history=history,
        attack="local_update",
        seconds=0.0,
        info={"steps": int(steps), "lr": float(lr), "noise_variance": float(noise_variance)},
    )


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()
