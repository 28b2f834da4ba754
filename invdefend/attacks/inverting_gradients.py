"""Inverting Gradients (Geiping, Bauermeister, Dröge and Moeller, NeurIPS 2020).

Cosine-similarity gradient matching with a total-variation prior,

    min_{x ∈ [0,1]^d}  1 − ⟨g(x), g̃⟩ / (‖g(x)‖ ‖g̃‖)  +  α_TV · TV(x),

optimised with Adam on the *signed* gradient, a step-wise learning-rate decay (×0.1 at 3/8, 5/8 and 7/8
of the iterations), the box constraint enforced by clamping after every step, and several random
restarts of which the one with the lowest final objective is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    total_variation,
)
from .dlg import check_labels, random_start

__all__ = ["inverting_gradients"]


def inverting_gradients(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    iterations: int = 1000,
    lr: float = 0.1,
    restarts: int = 1,
    tv_weight: float = 1e-2,
    signed_gradient: bool = True,
    init: str = "uniform",
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """Reconstruct a batch from its shared gradient by cosine matching + TV prior (Inverting Gradients).

    Threat model: an honest-but-curious server that knows the model architecture and weights, the loss, the
    batch shape and the labels, and receives the exact (undefended) mean gradient of the batch. Cosine
    matching makes the attack insensitive to the gradient's scale (e.g. a learning rate folded into an
    update). With ``labels=None`` the label of a single sample is first recovered with
    :func:`invdefend.attacks.idlg.idlg_label` (batch 1 only).

    Args:
        model: the victim model (not modified).
        target_gradient: the shared gradient, flat ``(m,)`` or one tensor per trainable parameter.
        input_shape: shape of the attacked batch, e.g. ``(1, 3, 32, 32)``.
        labels: known labels ``(B,)``; ``None`` infers the label of a batch of one with iDLG.
        loss_fn: ``loss_fn(logits, labels) -> scalar mean loss``.
        iterations: Adam steps per restart.
        lr: initial Adam step size (decayed ×0.1 at 3/8, 5/8 and 7/8 of the run).
        restarts: independent random starts; the lowest final objective wins.
        tv_weight: weight ``α_TV`` of the total-variation prior (TV = mean |neighbour difference|); 1e-2 suited
            32x32 natural patches, 1e-4 the sharp-edged 8x8 digits.
        signed_gradient: step on the sign of the gradient (as in the paper).
        init: random start, ``"uniform"``, ``"normal"`` or ``"gray"`` (clamped into [0, 1]).
        dtype: work in this dtype; default: the model's.
        mode: evaluate the model in ``"eval"`` or ``"train"`` mode.
        generator, seed: source of the random starts (default ``seed=0``).

    Returns:
        :class:`AttackResult`; ``info["restart_losses"]`` holds every restart's final objective.
    """
    where = "attacks.inverting_gradients"
    shape = check_input_shape(input_shape, where)
    check_positive(where, iterations=iterations, lr=lr, restarts=restarts)
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    with Timer() as timer:
        fm = FunctionalModel(model, dtype=dtype, mode=mode, where=where)
        target = as_flat_gradient(target_gradient, model, where).to(fm.dtype)
        if labels is None:
            from .idlg import idlg_label

            if shape[0] != 1:
                raise ValueError(
                    f"invdefend.{where}: labels=None needs a batch of one (iDLG), got batch {shape[0]}; pass labels="
                )
            labels = idlg_label(model, target)
        labels = check_labels(labels, shape[0], where)
        gen = make_generator(generator, seed, where)
        milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]

        def objective(x: Tensor) -> Tensor:
            g = fm.gradient(x, labels, loss_fn, create_graph=True)
            loss = 1.0 - F.cosine_similarity(g, target, dim=0, eps=1e-12)
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(x)
            return loss

        best: tuple[float, Tensor, list[float]] | None = None
        finals: list[float] = []
        for _ in range(restarts):
            x = random_start(shape, gen, fm.dtype, init, where).clamp_(0.0, 1.0).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            history: list[float] = []
            for _ in range(iterations):
                opt.zero_grad()
                loss = objective(x)
                loss.backward()
                if signed_gradient:
                    x.grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                history.append(float(loss.detach()))
            final = float(objective(x).detach())
            finals.append(final)
            if best is None or final < best[0]:
                best = (final, x.detach().clone(), history)
        assert best is not None
    return AttackResult(
        best[1], labels, best[2], "inverting_gradients", timer.seconds, {"restart_losses": finals}
    )
