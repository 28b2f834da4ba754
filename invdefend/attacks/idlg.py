"""iDLG (Zhao, Mopuri and Bilen, 2020): the label of a single sample read off the last layer's gradient.

For a final layer ``z = W h + b`` followed by softmax cross-entropy, the gradient of row ``i`` is
``∂L/∂W_i = (p_i − y_i) h``. With one sample, ``p_i − y_i`` is negative only for the true class ``c`` and
the coefficients sum to zero, so the row sums ``s_i = (p_i − y_i) Σ_j h_j`` satisfy
``|s_c| = Σ_{i≠c} |s_i|``: the true class is the row whose sum is largest in magnitude (with non-negative
activations, e.g. sigmoid or ReLU, it is also the only negative row, the rule of the paper; the magnitude
rule also covers activations of either sign). When the layer has a bias, its gradient ``p − y`` gives the
label directly (``argmin``); the weight rule is used otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import AttackResult, LossFn, as_flat_gradient, split_flat, trainable_named_parameters
from .dlg import dlg

__all__ = ["idlg_label", "idlg_attack", "linear_layer_gradients"]


def linear_layer_gradients(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    layer: nn.Linear,
    where: str = "attacks",
) -> tuple[Tensor, Tensor | None]:
    """The slices of a shared gradient that belong to ``layer``: ``(dL/dW (out, in), dL/db (out,) or None)``.

    ``layer`` must be a submodule of ``model`` whose weight requires grad.
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"invdefend.{where}: layer must be an nn.Linear, got {type(layer).__name__}")
    flat = as_flat_gradient(target_gradient, model, where)
    named = trainable_named_parameters(model, where)
    pieces = split_flat(flat, [p.shape for _, p in named])
    w_grad = b_grad = None
    for (_, p), g in zip(named, pieces):
        if p is layer.weight:
            w_grad = g
        elif layer.bias is not None and p is layer.bias:
            b_grad = g
    if w_grad is None:
        raise ValueError(
            f"invdefend.{where}: the given layer's weight is not among the model's trainable parameters; pass a "
            "submodule of model whose weight has requires_grad=True"
        )
    return w_grad, b_grad


def _last_linear(model: nn.Module, where: str) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not linears:
        raise ValueError(
            f"invdefend.{where}: {type(model).__name__} has no trainable nn.Linear; pass layer= (the final "
            "classification layer)"
        )
    return linears[-1]


def idlg_label(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    *,
    layer: nn.Linear | None = None,
    use_bias: bool = True,
) -> Tensor:
    """Recover the label of a single sample from its cross-entropy gradient (iDLG).

    Threat model: the server knows the architecture (which layer is the classifier) and receives the exact
    gradient of **one** sample under softmax cross-entropy; no weights or inputs are needed.

    Args:
        model: the victim model (only used to locate the layer's slice of the gradient).
        target_gradient: the shared gradient, flat ``(m,)`` or one tensor per trainable parameter.
        layer: the final classification layer; default: the last trainable ``nn.Linear`` of ``model``.
        use_bias: read the label from the bias gradient when the layer has one (exact); else from the weight.

    Returns:
        ``(1,)`` int64 tensor with the recovered class.
    """
    where = "attacks.idlg_label"
    layer = layer if layer is not None else _last_linear(model, where)
    w_grad, b_grad = linear_layer_gradients(model, target_gradient, layer, where)
    if use_bias and b_grad is not None:
        label = torch.argmin(b_grad)
    else:
        label = torch.argmax(w_grad.sum(dim=1).abs())
    return label.reshape(1).to(torch.long)


def idlg_attack(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    loss_fn: LossFn = F.cross_entropy,
    layer: nn.Linear | None = None,
    **dlg_options: object,
) -> AttackResult:
    """iDLG: recover the label with :func:`idlg_label`, then run :func:`invdefend.attacks.dlg.dlg` with it.

    Threat model: as DLG (model weights, loss, exact gradient) but without the label, for a batch of one
    under softmax cross-entropy. ``dlg_options`` are passed on to :func:`~invdefend.attacks.dlg.dlg`
    (``iterations``, ``dtype``, ``seed``, ...).
    """
    if int(input_shape[0]) != 1:
        raise ValueError(
            f"invdefend.attacks.idlg_attack: iDLG recovers the label of a batch of one; got input_shape "
            f"{tuple(input_shape)}. Use dlg(labels=None) for larger batches"
        )
    if "labels" in dlg_options:
        raise ValueError("invdefend.attacks.idlg_attack: labels are inferred; call dlg(labels=...) to pass them")
    label = idlg_label(model, target_gradient, layer=layer)
    options: dict = dict(dlg_options)
    result = dlg(model, target_gradient, input_shape=input_shape, labels=label, loss_fn=loss_fn, **options)
    result.attack = "idlg"
    return result
