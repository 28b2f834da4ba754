"""The multi-release attacker: one MAP reconstruction from every release of the same sample across rounds.

THEORY §7 ("Repetition"): a sample released ``T`` times with fresh noise gives the attacker
``Σ_t J_tᵀ Σ_t⁻¹ J_t``, and the model moves between releases. This attacker uses all of it without
linearising: with round ``t``'s weights ``θ_t``, release ``g̃_t = g(x; θ_t) + ε_t`` and noise law
``ε_t ~ N(0, Σ_t)``, it computes

    min_x  Σ_t ½ ‖g̃_t − g(x; θ_t)‖²_{Σ_t⁻¹}  +  ½ ‖x − μ‖²/v0  +  α_TV·TV(x)  +  prior.neg_log_density(x),

the maximum-a-posteriori estimate of the round-by-round likelihood (the releases are independent given
``x``). With one model and one ``Σ`` it reduces to the defense-aware attacker on the mean of the releases
(:func:`~invdefend.attacks.defense_aware_gradient_attack`); with a moving model no single mean exists and
each round is matched against its own model. ``Σ_t⁻¹`` is applied matrix-free (:class:`NoiseCovariance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..noise_law import NoiseCovariance
from ._common import (
    IID_PRIOR_MEAN,
    IID_PRIOR_VAR,
    AttackResult,
    DefaultFloat,
    FunctionalModel,
    LossFn,
    Mode,
    Timer,
    as_flat_gradient,
    check_input_shape,
    check_positive,
    check_prior_replaces_iid,
    make_generator,
    projected_adam,
    total_variation,
)
from .dlg import check_labels, random_start

__all__ = ["multi_release_gradient_attack"]


_IID_MEAN, _IID_VAR = IID_PRIOR_MEAN, IID_PRIOR_VAR


def _per_round(value: Any, rounds: int, name: str, where: str) -> list[Any]:
    """``value`` repeated for every round, or a sequence checked to hold one item per round."""
    if isinstance(value, (nn.Module, NoiseCovariance)):
        return [value] * rounds
    items = list(value)
    if len(items) != rounds:
        raise ValueError(
            f"invdefend.{where}: {len(items)} {name} for {rounds} releases; pass one per release (round), or a "
            f"single one for all of them"
        )
    return items


def multi_release_gradient_attack(
    models: nn.Module | Sequence[nn.Module],
    releases: Sequence[Tensor | Sequence[Tensor]] | Tensor,
    *,
    noise: NoiseCovariance | Sequence[NoiseCovariance],
    input_shape: Sequence[int],
    labels: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    iterations: int = 500,
    lr: float | None = None,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
    rel_tol: float = 0.0,
    prior_mean: float | Tensor | None = _IID_MEAN,
    prior_var: float | None = _IID_VAR,
    tv_weight: float = 0.0,
    prior: Any | None = None,
    init: str | Tensor = "uniform",
    dtype: torch.dtype | None = torch.float64,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """MAP reconstruction of one batch from all its noisy gradient releases across rounds.

    Threat model: an honest-but-curious server (or anyone who sees every round) that, for every round ``t`` in
    which the attacked batch was released, knows the model weights ``θ_t`` the gradient was computed at (the
    server sent them), the loss, the labels, the batch shape, **and the defense's noise law** ``N(0, Σ_t)`` of
    that round (the defense is public), and can link the releases to the same batch (a client's fixed local
    batch across FedSGD rounds, or sample ids). The noise is drawn afresh at every release, so the releases
    are independent given the batch. For one sample released inside different batches, the per-sample view of
    the theory (the attacker knows the rest of each batch, §4.1) turns each round into this form with
    ``n_t²·Σ_t``.

    Args:
        models: round ``t``'s model (weights ``θ_t``), one per release; a single module for a model that did
            not move. Not modified.
        releases: the noisy gradients ``g̃_t``, a stack ``(T, m)`` or a sequence, each flat ``(m,)`` or a list
            of per-parameter tensors of its round's model.
        noise: the noise covariance ``Σ_t`` of each release, or one for all.
        input_shape: shape of the attacked batch, e.g. ``(1, 3, 32, 32)``.
        labels: known labels ``(B,)`` (the same in every round).
        loss_fn: ``loss_fn(logits, labels) -> scalar mean loss``.
        iterations: L-BFGS iterations (chunks of 20) or Adam steps.
        lr: step size (default 1 for L-BFGS, 0.05 for Adam).
        optimizer: ``"lbfgs"`` (unconstrained, output clamped to [0, 1]) or ``"adam"`` (clamped each step).
        rel_tol: L-BFGS only: stop once a chunk of 20 iterations lowers the objective by less than
            ``rel_tol·|objective|`` (0, the default, runs every iteration). Many releases from one model make a
            badly conditioned objective that needs ~1000 iterations at 32×32, a moving model far fewer.
        prior_mean, prior_var: i.i.d. Gaussian prior ``N(μ, v0·I)`` on the pixels (default mean 0.5, variance
            1/12); ``prior_var=None`` disables it.
        tv_weight: weight of a total-variation prior.
        prior: any object with ``neg_log_density(x) -> (B,)`` or scalar (e.g. an
            :class:`invdefend.prior.GaussianPrior`); it replaces the default i.i.d. prior (passing both
            ``prior`` and an explicit ``prior_var``/``prior_mean`` is refused).
        init: random start, ``"uniform"``, ``"normal"`` or ``"gray"``, or a starting tensor shaped like the batch.
        dtype: working dtype (float64 by default: ``Σ_t⁻¹`` can be badly conditioned).
        mode: evaluate the models in ``"eval"`` or ``"train"`` mode.
        generator, seed: source of the random start (default ``seed=0``).

    Returns:
        :class:`AttackResult`; ``info["releases"]`` is ``T``, ``info["models"]`` the number of distinct models.
    """
    where = "attacks.multi_release_gradient_attack"
    shape = check_input_shape(input_shape, where)
    labels = check_labels(labels, shape[0], where)
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"invdefend.{where}: optimizer={optimizer!r}; choose 'lbfgs' or 'adam'")
    lr = (1.0 if optimizer == "lbfgs" else 0.05) if lr is None else lr
    check_positive(where, iterations=iterations, lr=lr)
    if not (rel_tol >= 0 and math.isfinite(rel_tol)):
        raise ValueError(f"invdefend.{where}: rel_tol={rel_tol} must be a finite number >= 0")
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    if prior is not None:
        if not callable(getattr(prior, "neg_log_density", None)):
            raise ValueError(
                f"invdefend.{where}: prior must have a neg_log_density(x) method (e.g. invdefend.prior.GaussianPrior), "
                f"got {type(prior).__name__}"
            )
        check_prior_replaces_iid(where, prior_mean, prior_var)
        prior_var = None
    if prior_var is not None and not prior_var > 0:
        raise ValueError(f"invdefend.{where}: prior_var={prior_var} must be > 0, or None for no Gaussian prior")
    if isinstance(releases, Tensor):
        if releases.dim() != 2:
            raise ValueError(
                f"invdefend.{where}: a releases tensor must be a stack (T, m), got shape {tuple(releases.shape)}; "
                "pass a sequence for releases given as per-parameter lists"
            )
        release_list: list[Any] = list(releases)
    else:
        release_list = list(releases)
    if not release_list:
        raise ValueError(f"invdefend.{where}: got no releases")
    rounds = len(release_list)
    model_list = _per_round(models, rounds, "models", where)
    noise_list = _per_round(noise, rounds, "noise covariances", where)

    with Timer() as timer:
        # One functional copy per distinct model; every release of that model is matched against it.
        groups: dict[int, tuple[FunctionalModel, list[tuple[Tensor, NoiseCovariance, Any]]]] = {}
        for t, (model, g, cov) in enumerate(zip(model_list, release_list, noise_list)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"invdefend.{where}: models[{t}] must be a torch.nn.Module, got {type(model).__name__}")
            if not isinstance(cov, NoiseCovariance):
                raise TypeError(f"invdefend.{where}: noise[{t}] must be a NoiseCovariance, got {type(cov).__name__}")
            if id(model) not in groups:
                groups[id(model)] = (FunctionalModel(model, dtype=dtype, mode=mode, where=where), [])
            fm, items = groups[id(model)]
            flat = as_flat_gradient(g, model, where).to(fm.dtype)
            if cov.dim is not None and cov.dim != flat.numel():
                raise ValueError(
                    f"invdefend.{where}: noise[{t}] has a basis of m={cov.dim} rows but release {t} has "
                    f"{flat.numel()} entries"
                )
            if cov.basis is not None and cov.basis.dim() != 2:
                raise ValueError(f"invdefend.{where}: noise[{t}]: a shared gradient has one noise basis, (m, r)")
            items.append((flat, cov, cov.eigenbasis(fm.dtype)))
        work = next(iter(groups.values()))[0].dtype
        mu = None if prior_mean is None else torch.as_tensor(float(prior_mean) if isinstance(prior_mean, DefaultFloat)
                                                             else prior_mean, dtype=work)

        def objective(x: Tensor) -> Tensor:
            loss = x.new_zeros(())
            for fm, items in groups.values():
                g = fm.gradient(x, labels, loss_fn, create_graph=True)
                for target, cov, eig in items:
                    loss = loss + 0.5 * cov.mahalanobis(g - target, _eig=eig)
            if prior_var is not None and mu is not None:
                loss = loss + 0.5 * (x - mu).pow(2).sum() / float(prior_var)
            if prior is not None:
                loss = loss + prior.neg_log_density(x).sum()
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(x)
            return loss

        gen = make_generator(generator, seed, where)
        if isinstance(init, Tensor):
            if tuple(init.shape) != shape:
                raise ValueError(
                    f"invdefend.{where}: init tensor has shape {tuple(init.shape)} but input_shape is {shape}"
                )
            x = init.detach().to(work).clone()
        else:
            x = random_start(shape, gen, work, init, where)
        x.requires_grad_(True)
        history: list[float] = []
        if optimizer == "lbfgs":
            _lbfgs(x, objective, iterations, history, lr=lr, rel_tol=rel_tol)
        else:
            projected_adam(x, objective, iterations, history, lr=lr)
        rec = x.detach().clamp(0.0, 1.0)
    return AttackResult(rec, labels, history, "multi_release_gradient", timer.seconds,
                        {"releases": rounds, "models": len(groups)})


def _lbfgs(x: Tensor, objective: Any, iterations: int, history: list[float], *, lr: float, rel_tol: float) -> None:
    """L-BFGS (strong Wolfe, memory 100) on ``x`` in chunks of 20 iterations, as
    :func:`~invdefend.attacks._common.minimize_lbfgs`, plus the relative-progress stop ``rel_tol``."""
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=20, history_size=100, tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        history.append(float(loss.detach()))
        return loss

    for _ in range(-(-iterations // 20)):
        before = len(history)
        previous = history[-1] if history else math.inf
        opt.step(closure)
        last = history[-1]
        if not math.isfinite(last) or len(history) - before <= 1:  # diverged, or converged/stalled
            break
        if rel_tol > 0 and previous - last <= rel_tol * abs(last):
            break
