"""Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019): L2 gradient matching with L-BFGS.

Find a dummy input ``x`` (and, when the labels are unknown, dummy soft labels) whose gradient matches the
shared one: ``min_x ||g(x) - g̃||² / ||g̃||²``. The objective is normalised by the target's squared norm
(the minimiser is unchanged; it only keeps the numbers O(1) for L-BFGS's tolerances).
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
    minimize_lbfgs,
    total_variation,
)

__all__ = ["dlg", "random_start"]


def random_start(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype, init: str, where: str) -> Tensor:
    """A random dummy input: ``"uniform"`` in [0, 1], ``"normal"`` N(0, 1) (DLG's), ``"gray"`` 0.5 + N(0, 0.1²)."""
    if init == "uniform":
        return torch.rand(tuple(shape), generator=generator, dtype=dtype)
    if init == "normal":
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)
    if init == "gray":
        return 0.5 + 0.1 * torch.randn(tuple(shape), generator=generator, dtype=dtype)
    raise ValueError(f"invdefend.{where}: init={init!r}; choose 'uniform', 'normal' or 'gray'")


def dlg(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    iterations: int = 1000,
    lr: float = 1.0,
    history_size: int = 100,
    tv_weight: float = 0.0,
    init: str = "uniform",
    clamp_output: bool = True,
    stop_loss: float = 0.0,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """Reconstruct a batch from its shared gradient by L2 gradient matching with L-BFGS (DLG).

    Threat model: an honest-but-curious server that knows the model architecture and weights (the ones the
    gradient was computed at), the loss, the batch shape, and receives the exact (undefended) mean gradient
    of the batch. Labels are known (``labels=``, the common assumption: they are recoverable, see
    :mod:`invdefend.attacks.idlg`) or, with ``labels=None``, optimised jointly as soft labels (the original
    DLG); ``loss_fn`` must then accept class-probability targets ``(B, K)``, as ``F.cross_entropy`` does.

    Args:
        model: the victim model (not modified; evaluated on detached copies).
        target_gradient: the shared gradient, flat ``(m,)`` or one tensor per trainable parameter.
        input_shape: shape of the attacked batch, e.g. ``(1, 3, 32, 32)``.
        labels: known labels ``(B,)``, or ``None`` to optimise soft labels.
        loss_fn: ``loss_fn(logits, labels) -> scalar mean loss``.
        iterations: L-BFGS iterations in total (run in chunks of 20; 1000 took LeNet-sigmoid 32x32 patches
            to 30 dB mean in float64, about 6 s each on one core).
        lr: L-BFGS step size (1 with a strong-Wolfe line search).
        history_size: L-BFGS memory.
        tv_weight: weight of a total-variation prior (0 in the original DLG).
        init: random start, ``"uniform"`` (default), ``"normal"`` or ``"gray"``.
        clamp_output: clip the returned reconstruction to [0, 1] (the optimisation itself is unconstrained).
        stop_loss: stop once the normalised matching loss falls to this value.
        dtype: work in this dtype (``torch.float64`` lets L-BFGS converge much further); default: the model's.
        mode: evaluate the model in ``"eval"`` or ``"train"`` mode (must match how the gradient was made).
        generator, seed: source of the random start (default ``seed=0``).

    Returns:
        :class:`AttackResult` with ``loss_history`` = the objective at every L-BFGS function evaluation.
    """
    where = "attacks.dlg"
    shape = check_input_shape(input_shape, where)
    check_positive(where, iterations=iterations, lr=lr, history_size=history_size)
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    with Timer() as timer:
        fm = FunctionalModel(model, dtype=dtype, mode=mode, where=where)
        target = as_flat_gradient(target_gradient, model, where).to(fm.dtype)
        norm2 = target.pow(2).sum().clamp_min(torch.finfo(fm.dtype).tiny)
        gen = make_generator(generator, seed, where)
        x = random_start(shape, gen, fm.dtype, init, where).requires_grad_(True)
        variables = [x]
        soft: Tensor | None = None
        if labels is None:
            with torch.no_grad():
                num_classes = fm(x.detach()).shape[-1]
            soft = torch.randn(shape[0], num_classes, generator=gen, dtype=fm.dtype).requires_grad_(True)
            variables.append(soft)
        else:
            labels = check_labels(labels, shape[0], where)

        history: list[float] = []

        def matching_loss() -> Tensor:
            y = labels if soft is None else soft.softmax(dim=-1)
            g = fm.gradient(x, y, loss_fn, create_graph=True)
            loss = (g - target).pow(2).sum() / norm2
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(x)
            return loss

        minimize_lbfgs(variables, matching_loss, iterations, history, lr=lr, history_size=history_size,
                       stop_loss=stop_loss)
        rec = x.detach()
        if clamp_output:
            rec = rec.clamp(0.0, 1.0)
        label = labels if soft is None else soft.detach().argmax(dim=-1)
    return AttackResult(rec, label, history, "dlg", timer.seconds, {"evaluations": len(history)})


def check_labels(labels: Tensor, batch: int, where: str) -> Tensor:
    """``labels`` as a ``(batch,)`` long tensor of class indices; a clear error naming ``where`` otherwise."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"invdefend.{where}: labels must be a torch.Tensor of class indices, or None")
    if labels.shape[0] != batch:
        raise ValueError(
            f"invdefend.{where}: labels has {labels.shape[0]} rows but input_shape has batch {batch}; "
            "pass one label per attacked sample"
        )
    return labels.detach()
