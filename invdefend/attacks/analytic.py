"""Analytic reconstruction of the input to a leading fully-connected layer (Phong et al., 2017).

For a first layer ``z = W x + b`` on the flattened input, one sample's gradient is ``∂L/∂W = δ xᵀ`` and
``∂L/∂b = δ`` with ``δ = ∂L/∂z``, so every row with ``δ_i ≠ 0`` gives
``x = (∂L/∂W_i) / (∂L/∂b_i)``.
All rows are combined by least squares, ``x = Σ_i δ_i ∂L/∂W_i / Σ_i δ_i²``, which is exact for a batch of
one and weights each row by its signal. No optimisation, no weights needed beyond locating the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import AttackResult, Timer, check_input_shape
from .idlg import linear_layer_gradients

__all__ = ["analytic_linear_attack"]


def _first_linear(model: nn.Module, where: str) -> nn.Linear:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m
    raise ValueError(
        f"invdefend.{where}: {type(model).__name__} has no nn.Linear; the analytic attack needs a leading "
        "fully-connected layer (pass layer=)"
    )


def analytic_linear_attack(
    model: nn.Module,
    target_gradient: Tensor | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    layer: nn.Linear | None = None,
    clamp_output: bool = False,
) -> AttackResult:
    """Recover a single input exactly from the weight and bias gradient of its first linear layer.

    Threat model: the server knows the architecture (which layer reads the flattened input; its weights are
    not needed) and receives the exact gradient of **one** sample; the labels and the loss are irrelevant.
    (For a batch the same formula gives a ``δ``-weighted mixture of the inputs, so only ``B = 1`` is accepted.)

    Args:
        model: the victim model (only used to locate the layer's slice of the gradient).
        target_gradient: the shared gradient, flat ``(m,)`` or one tensor per trainable parameter.
        input_shape: shape of the attacked input, ``(1, ...)`` with ``prod(...) == layer.in_features``.
        layer: the ``nn.Linear`` that reads the flattened input; default: the first ``nn.Linear`` of ``model``.
        clamp_output: clip the reconstruction to [0, 1].

    Returns:
        :class:`AttackResult` (``loss_history`` empty; ``info["bias_grad_norm"]`` = ``‖∂L/∂b‖``).
    """
    where = "attacks.analytic_linear_attack"
    shape = check_input_shape(input_shape, where)
    if shape[0] != 1:
        raise ValueError(
            f"invdefend.{where}: input_shape {shape} has batch {shape[0]}; the analytic attack is exact for a "
            "batch of one only (attack per-sample gradients one at a time)"
        )
    with Timer() as timer:
        layer = layer if layer is not None else _first_linear(model, where)
        d = math.prod(shape[1:])
        if layer.in_features != d:
            raise ValueError(
                f"invdefend.{where}: the layer reads {layer.in_features} features but input_shape {shape} has "
                f"{d} per sample; the attack needs a linear layer on the flattened input (pass layer=)"
            )
        if layer.bias is None:
            raise ValueError(f"invdefend.{where}: the layer has no bias; the analytic attack needs dL/db")
        w_grad, b_grad = linear_layer_gradients(model, target_gradient, layer, where)
        if b_grad is None:
            raise ValueError(
                f"invdefend.{where}: the layer's bias does not require grad, so its gradient is not shared; "
                "the analytic attack needs dL/db"
            )
        w64, b64 = w_grad.to(torch.float64), b_grad.to(torch.float64)
        denom = b64.pow(2).sum()
        if float(denom) == 0.0:
            raise ValueError(
                f"invdefend.{where}: the bias gradient is zero (no signal reaches the first layer); nothing to invert"
            )
        x = (b64 @ w64) / denom
        rec = x.to(w_grad.dtype).reshape(shape)
        if clamp_output:
            rec = rec.clamp(0.0, 1.0)
    return AttackResult(rec, None, [], "analytic_linear", timer.seconds, {"bias_grad_norm": float(denom.sqrt())})
