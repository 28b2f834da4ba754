"""Shared pieces of the attack suite: the result type, gradient flattening, a functional copy of the
victim model, priors and seeding.

The shared gradient is always laid out as the concatenation, in registration order, of the gradients of
``[p for p in model.parameters() if p.requires_grad]``, each flattened (``Tensor.reshape(-1)``).
Attacks never touch the model's own tensors: :class:`FunctionalModel` evaluates the model through
``torch.func.functional_call`` on detached copies of its parameters and buffers (optionally cast to another
dtype), and restores every submodule's train/eval flag afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..jacobian import module_mode

__all__ = [
    "AttackResult",
    "LossFn",
    "FunctionalModel",
    "trainable_named_parameters",
    "flatten_gradients",
    "as_flat_gradient",
    "split_flat",
    "model_gradient",
    "per_sample_gradients",
    "total_variation",
    "make_generator",
    "check_input_shape",
    "DefaultFloat",
    "IID_PRIOR_MEAN",
    "IID_PRIOR_VAR",
    "check_prior_replaces_iid",
    "check_positive",
    "minimize_lbfgs",
    "projected_adam",
    "Timer",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits, labels) -> scalar mean loss`` (e.g. ``torch.nn.functional.cross_entropy``)."""

Mode = Literal["eval", "train"]


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
        reconstruction: the recovered input, shaped like the attacked batch ``(B, ...)``, detached.
        label: recovered (or the known) labels ``(B,)`` as int64, or ``None`` when the attack has none.
        loss_history: the attack objective per iteration (of the kept restart).
        attack: the attack's name.
        seconds: wall-clock time of the whole attack.
        info: attack-specific extras (e.g. every restart's final loss).
    """

    reconstruction: Tensor
    label: Tensor | None
    loss_history: list[float]
    attack: str
    seconds: float
    info: dict[str, object] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """The last recorded objective value (``nan`` when nothing was recorded)."""
        return self.loss_history[-1] if self.loss_history else float("nan")


def trainable_named_parameters(model: nn.Module, where: str = "attacks") -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"invdefend.{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"invdefend.{where}: {type(model).__name__} has no parameter with requires_grad=True, so it shares "
            "no gradient; unfreeze a layer or attack the embedding instead"
        )
    return named


def flatten_gradients(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate a list of gradient tensors into one flat vector ``(m,)`` (order preserved)."""
    if len(grads) == 0:
        raise ValueError("invdefend.attacks.flatten_gradients: got an empty list of gradients")
    return torch.cat([g.reshape(-1) for g in grads])


def split_flat(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Inverse of :func:`flatten_gradients`: views of ``flat`` with the given shapes."""
    out, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[start : start + n].reshape(s))
        start += n
    if start != flat.numel():
        raise ValueError(
            f"invdefend.attacks.split_flat: the shapes hold {start} numbers but the vector has {flat.numel()}"
        )
    return out


def as_flat_gradient(target: Tensor | Sequence[Tensor], model: nn.Module, where: str = "attacks") -> Tensor:
    """Validate a shared gradient (flat ``(m,)`` or a list matching the trainable parameters) and flatten it.

    Returns a detached flat vector.
    """
    named = trainable_named_parameters(model, where)
    m = sum(p.numel() for _, p in named)
    if isinstance(target, Tensor):
        flat = target.detach().reshape(-1) if target.dim() == 1 else None
        if flat is None:
            raise ValueError(
                f"invdefend.{where}: target_gradient tensor must be flat (m,), got shape {tuple(target.shape)}; "
                "pass a flat vector or a list of per-parameter gradients"
            )
    else:
        grads = list(target)
        if len(grads) != len(named):
            raise ValueError(
                f"invdefend.{where}: target_gradient has {len(grads)} tensors but the model has {len(named)} "
                "trainable parameters; pass one gradient per parameter with requires_grad, in registration order"
            )
        for (name, p), g in zip(named, grads):
            if g.shape != p.shape:
                raise ValueError(
                    f"invdefend.{where}: target_gradient for {name} has shape {tuple(g.shape)}, "
                    f"expected {tuple(p.shape)}"
                )
        flat = flatten_gradients([g.detach() for g in grads])
    if flat.numel() != m:
        raise ValueError(
            f"invdefend.{where}: target_gradient has {flat.numel()} entries but the model has {m} trainable "
            "parameters; flatten the gradients of [p for p in model.parameters() if p.requires_grad]"
        )
    return flat


class FunctionalModel:
    """A side-effect-free view of ``model``: detached copies of its parameters and buffers.

    Calling it evaluates ``model`` on the copies with ``torch.func.functional_call`` in the requested
    ``mode`` (the model's own train/eval flags are restored after every call). The trainable copies
    (``self.params``) require grad so that gradients with respect to them can be taken with
    ``create_graph=True``; they are never updated.

    Args:
        model: the victim model (not modified).
        dtype: dtype of the copies (e.g. ``torch.float64`` for tighter L-BFGS convergence); default: keep.
        mode: ``"eval"`` (default; dropout off, BatchNorm on running stats) or ``"train"``.
    """

    def __init__(
        self, model: nn.Module, *, dtype: torch.dtype | None = None, mode: Mode = "eval", where: str = "attacks"
    ) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"invdefend.{where}: mode={mode!r}; use 'eval' or 'train'")
        self.model = model
        self.mode: Mode = mode
        named = trainable_named_parameters(model, where) if any(p.requires_grad for p in model.parameters()) else []
        trainable = {n for n, _ in named}

        def cast(t: Tensor) -> Tensor:
            t = t.detach().clone()
            return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t

        self.params: dict[str, Tensor] = {n: cast(p).requires_grad_(True) for n, p in named}
        self.frozen: dict[str, Tensor] = {n: cast(p) for n, p in model.named_parameters() if n not in trainable}
        self.buffers: dict[str, Tensor] = {n: cast(b) for n, b in model.named_buffers()}
        first = next(iter(model.parameters()), None)
        self.dtype: torch.dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
        self.shapes: list[torch.Size] = [p.shape for p in self.params.values()]

    @property
    def num_params(self) -> int:
        """Number of trainable parameters ``m`` (length of the shared gradient)."""
        return sum(p.numel() for p in self.params.values())

    def __call__(self, x: Tensor) -> Tensor:
        """The model's output on ``x``, computed on the copies."""
        # Buffers are re-cloned so that a train-mode call cannot update the stored running statistics.
        state = {**self.params, **self.frozen, **{n: b.clone() for n, b in self.buffers.items()}}
        with module_mode(self.model, self.mode):
            return functional_call(self.model, state, (x,))

    def gradient(self, x: Tensor, labels: Tensor, loss_fn: LossFn, *, create_graph: bool = True) -> Tensor:
        """Flat gradient ``(m,)`` of ``loss_fn(model(x), labels)`` w.r.t. the trainable parameters.

        With ``create_graph=True`` the result is differentiable w.r.t. ``x`` (and soft ``labels``).
        """
        loss = loss_fn(self(x), labels)
        grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=create_graph)
        return flatten_gradients(grads)


def model_gradient(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    *,
    mode: Mode = "eval",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The flat shared gradient ``(m,)`` of the batch mean loss, computed without touching ``model``.

    This is what a victim releases in one federated / data-parallel step (before any defense).
    """
    fm = FunctionalModel(model, dtype=dtype, mode=mode, where="attacks.model_gradient")
    x = inputs.to(fm.dtype) if inputs.is_floating_point() else inputs
    return fm.gradient(x, labels, loss_fn, create_graph=False).detach()


def per_sample_gradients(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    *,
    mode: Mode = "eval",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-sample flat gradients ``(B, m)`` (``torch.func.vmap`` over ``grad`` of ``functional_call``).

    Row ``i`` is the gradient of ``loss_fn(model(x_i[None]), y_i[None])``; models whose forward cannot be
    vmapped (e.g. BatchNorm in train mode) are handled by a per-sample loop.
    """
    fm = FunctionalModel(model, dtype=dtype, mode=mode, where="attacks.per_sample_gradients")
    x = inputs.to(fm.dtype) if inputs.is_floating_point() else inputs
    rest = {**fm.frozen, **fm.buffers}
    names = list(fm.params)

    def one(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(fm.model, {**params, **rest}, (xi[None],))
        return loss_fn(out, yi[None])

    detached = {n: p.detach() for n, p in fm.params.items()}
    with module_mode(model, mode):
        try:
            g = vmap(grad(one), in_dims=(None, 0, 0))(detached, x, labels)
            return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)
        except (RuntimeError, NotImplementedError):
            rows = [fm.gradient(x[i : i + 1], labels[i : i + 1], loss_fn, create_graph=False) for i in range(len(x))]
            return torch.stack(rows).detach()


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of images ``(B, C, H, W)``: mean absolute difference of neighbours.

    Summed over the batch (each sample's TV is a mean over its pixels), so independent samples stay
    independent in a joint optimisation.
    """
    if x.dim() != 4:
        return x.new_zeros(())
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return (dh + dw).sum()


def make_generator(generator: torch.Generator | None, seed: int | None, where: str) -> torch.Generator:
    """The generator an attack draws its random start from: ``generator`` if given, else one seeded with
    ``seed`` (default 0, so attacks are reproducible unless told otherwise)."""
    if generator is not None and seed is not None:
        raise ValueError(f"invdefend.{where}: pass either generator= or seed=, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"invdefend.{where}: generator must be a torch.Generator")
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def check_input_shape(input_shape: Sequence[int], where: str) -> tuple[int, ...]:
    """Validate an input shape ``(B, ...)`` with positive sizes."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(
            f"invdefend.{where}: input_shape={tuple(input_shape)} must be a batch shape (B, ...) with positive "
            "sizes, e.g. (1, 3, 32, 32)"
        )
    return shape


def check_positive(where: str, **values: float) -> None:
    """Raise a ValueError naming the first non-positive value."""
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"invdefend.{where}: {name}={v} must be > 0")


def minimize_lbfgs(
    variables: Sequence[Tensor],
    loss_of: Callable[[], Tensor],
    iterations: int,
    history: list[float],
    *,
    lr: float = 1.0,
    history_size: int = 100,
    stop_loss: float = -math.inf,
) -> None:
    """Minimise ``loss_of()`` over ``variables`` in place with L-BFGS (strong-Wolfe line search), in chunks of
    20 iterations, appending every evaluated loss to ``history``. Stops after about ``iterations``
    iterations, at a non-finite loss, at a loss ``<= stop_loss``, or once L-BFGS stops after one evaluation
    (converged or stalled)."""
    opt = torch.optim.LBFGS(
        list(variables), lr=lr, max_iter=20, history_size=history_size, tolerance_grad=0.0, tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        history.append(float(loss.detach()))
        return loss

    for _ in range(-(-iterations // 20)):
        before = len(history)
        opt.step(closure)
        last = history[-1]
        if not math.isfinite(last) or last <= stop_loss:
            break
        if len(history) - before <= 1:  # converged: L-BFGS stopped after one evaluation
            break


def projected_adam(x: Tensor, loss_of: Callable[[Tensor], Tensor], iterations: int, history: list[float], *,
                   lr: float) -> None:
    """Minimise ``loss_of(x)`` over the leaf ``x`` in place with Adam, projecting ``x`` onto ``[0, 1]`` after
    every step; appends every loss to ``history``."""
    adam = torch.optim.Adam([x], lr=lr)
    for _ in range(iterations):
        adam.zero_grad()
        loss = loss_of(x)
        loss.backward()
        adam.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        history.append(float(loss.detach()))


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall-clock seconds of a block."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


class DefaultFloat(float):
    """A float default that remembers it was not passed, so that ``prior=`` can tell an explicit i.i.d.
    prior from the default one."""


#: The attacks' default i.i.d. prior ``N(0.5, 1/12·I)`` (uniform on [0, 1]), marked as not passed.
IID_PRIOR_MEAN = DefaultFloat(0.5)
IID_PRIOR_VAR = DefaultFloat(1.0 / 12.0)


def check_prior_replaces_iid(where: str, prior_mean: object, prior_var: object) -> None:
    """Refuse ``prior=`` given together with an explicit ``prior_mean=``/``prior_var=``: the prior object
    replaces the i.i.d. prior."""
    explicit = [n for n, v in (("prior_var", prior_var), ("prior_mean", prior_mean))
                if v is not None and not isinstance(v, DefaultFloat)]
    if explicit:
        raise ValueError(
            f"invdefend.{where}: got prior= and {' and '.join(explicit)}=; the prior object replaces the i.i.d. "
            "prior N(prior_mean, prior_var·I), so pass one or the other (GaussianPrior.iid(...) is the i.i.d. one)"
        )
