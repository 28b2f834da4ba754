"""Matrix-free Jacobians of what a client shares, with respect to its private input.

Two shared quantities are supported, each per sample:

* the per-sample gradient ``F(x) = ∇θ ℓ(f_θ(x), y)`` (horizontal FL, data-parallel training): ``J v`` is a
  forward-over-reverse product and ``Jᵀ u`` a reverse-over-reverse product (mixed second derivatives);
* a cut-layer embedding ``F(x) = h(x)`` (vertical FL, split learning): plain JVP / VJP.

A :class:`JacobianOperator` holds a batch of ``B`` samples and applies ``J`` to blocks of vectors for all of
them at once: ``matvec`` maps ``(B, d, b) -> (B, m, b)`` and ``rmatvec`` maps ``(B, m, b) -> (B, d, b)``.
Products are batched with ``torch.func.vmap``; where vmap cannot run (BatchNorm updating running
statistics in train mode, operations without a batching rule or double backward) the operator falls back
to a per-sample loop, warns once and records why in :attr:`JacobianOperator.fallback_reason`.

Train/eval mode and buffers: by default the function is evaluated with the model in **eval** mode
(``mode="eval"``) so that each sample's quantity is a deterministic function of that sample alone
(dropout off, BatchNorm on its running statistics). ``mode="train"`` evaluates in train mode; buffers are
always passed as *copies*, so running statistics of the user's model are never updated by the estimator.
The model's own mode flag is restored after every call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

__all__ = [
    "JacobianOperator",
    "JacobianError",
    "gradient_jacobian",
    "embedding_jacobian",
    "trainable_parameters",
    "check_inputs",
    "check_dtypes",
    "module_mode",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Mode = Literal["eval", "train"]


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters that require grad, by name, in registration order (the shared gradient's)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"invdefend.jacobian: {type(model).__name__} has no parameter with requires_grad=True, so no "
            "gradient is shared; unfreeze at least one layer or assess the embedding instead"
        )
    return params


@contextlib.contextmanager
def module_mode(module: nn.Module, mode: Mode) -> Iterator[None]:
    """Temporarily put every submodule in ``mode``, restoring each one's own flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def check_inputs(where: str, inputs: Tensor) -> None:
    """Refuse inputs no estimate can use (not a tensor, not a non-empty batch, not floating point, NaN/Inf)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"invdefend.{where}: inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ValueError(
            f"invdefend.{where}: inputs must be a non-empty batch shaped (B, ...), got shape {tuple(inputs.shape)}; "
            "add a leading batch dimension with inputs.unsqueeze(0)"
        )
    if not inputs.is_floating_point():
        raise TypeError(
            f"invdefend.{where}: inputs have dtype {inputs.dtype}; the Jacobian needs floating-point inputs. "
            "For token ids, assess the Jacobian with respect to the embedding layer's output: pass the "
            "embedded sequence as inputs and the rest of the model as the model"
        )
    if inputs.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"invdefend.{where}: half-precision inputs ({inputs.dtype}) are not supported by the spectral "
            "estimators (their error exceeds the accuracy they report); cast to float32 or float64"
        )
    if not torch.isfinite(inputs).all():
        raise ValueError(f"invdefend.{where}: inputs contain NaN or Inf; clean the batch before assessing it")


class JacobianError(RuntimeError):
    """The model (or loss) cannot be evaluated or differentiated one sample at a time."""


def _check_mode(where: str, mode: str) -> None:
    if mode not in ("eval", "train"):
        raise ValueError(
            f"invdefend.{where}: mode={mode!r}; choose 'eval' (dropout off, BatchNorm on its running "
            "statistics: each sample's quantity depends on that sample alone) or 'train'"
        )


def check_dtypes(where: str, module: nn.Module, inputs: Tensor) -> None:
    """Refuse half-precision models, and floating inputs whose dtype none of the parameters has."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    half = sorted(str(t) for t in dtypes & {torch.float16, torch.bfloat16})
    if half:
        raise TypeError(
            f"invdefend.{where}: {type(module).__name__} has half-precision parameters ({', '.join(half)}); "
            "the spectral estimators need float32 or float64 (half-precision error exceeds the accuracy they "
            "report): assess or defend a float32 copy, e.g. copy.deepcopy(model).float()"
        )
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and dtypes and inputs.dtype not in dtypes:
        want = sorted(str(t) for t in dtypes)[0]
        raise TypeError(
            f"invdefend.{where}: inputs are {inputs.dtype} but {type(module).__name__}'s parameters are "
            f"{', '.join(sorted(str(t) for t in dtypes))}; cast the inputs (inputs.to({want})) or the model "
            f"(model.to({inputs.dtype}))"
        )


def _locate_failure(module: nn.Module | None, thunk: Callable[[], object]) -> str:
    """Re-run a failing ``thunk`` with hooks on every submodule and name the innermost layer running when
    it raised (empty if it did not raise or hooks cannot be installed)."""
    if module is None:
        return ""
    stack: list[str] = []
    handles = []

    def leave(mod: nn.Module, args: tuple, out: object) -> None:  # must return None: keep the output
        if stack:
            stack.pop()

    try:
        for name, sub in module.named_modules():
            label = f"'{name or '<root>'}' ({type(sub).__name__})"
            handles.append(sub.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
            handles.append(sub.register_forward_hook(leave))
        thunk()
        return ""
    except Exception:
        if stack:
            return f"in layer {stack[-1]}"
        leaves = sorted({type(m).__name__ for m in module.modules() if next(m.children(), None) is None})
        return f"after the forward pass (in the loss, or in a derivative of one of {', '.join(leaves)})"
    finally:
        for h in handles:
            h.remove()


class JacobianOperator:
    """``J = ∂F/∂x`` for a batch of samples, applied matrix-free.

    Args:
        fn: ``fn(x, *extra) -> Tensor`` for ONE sample ``x`` shaped like ``inputs[0]``; its output is
            flattened to ``(m,)``.
        inputs: the batch ``(B, ...)`` at which J is taken.
        extra: per-sample tensors passed to ``fn`` alongside ``x`` (e.g. labels), each with leading dim B.
        vectorize: ``"auto"`` tries vmap and falls back to a loop on failure; ``True`` forces vmap
            (errors propagate); ``False`` always loops.
        name: what the operator computes, for messages.
        module: the model ``fn`` evaluates, to name the failing layer when it cannot be evaluated or
            differentiated one sample at a time (:class:`JacobianError`).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        inputs: Tensor,
        extra: tuple[Tensor, ...] = (),
        *,
        vectorize: bool | Literal["auto"] = "auto",
        name: str = "jacobian",
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        check_inputs(name, inputs)
        for e in extra:
            if e.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"invdefend.{name}: per-sample argument has batch size {e.shape[0]} but inputs have "
                    f"{inputs.shape[0]}; pass one target per input"
                )
        self._fn = fn
        self.inputs = inputs.detach()
        self.extra = tuple(e.detach() for e in extra)
        self.name = name
        self.sample_shape = tuple(inputs.shape[1:])
        self.batch_size = int(inputs.shape[0])
        self.in_dim = int(inputs[0].numel())
        self._vectorize = vectorize
        self._context = context or contextlib.nullcontext
        self.fallback_reason: str | None = None
        self.module = module

        def first() -> Tensor:
            return self._flat_fn(self.inputs[0], *(e[0] for e in self.extra))

        try:
            with self._context():
                out0 = first()
        except Exception as exc:
            raise self._unsupported(exc, first) from exc
        self.out_dim = int(out0.numel())
        self.dtype = out0.dtype
        self.device = out0.device

    # -- the per-sample function ------------------------------------------------------------------------
    def _flat_fn(self, x: Tensor, *extra: Tensor) -> Tensor:
        return self._fn(x, *extra).reshape(-1)

    def _jv_one(self, x: Tensor, extra: tuple[Tensor, ...], V: Tensor) -> Tensor:
        """``J V`` for one sample; ``V`` is ``(d, b)``, result ``(m, b)``."""

        def f(z: Tensor) -> Tensor:
            return self._flat_fn(z, *extra)

        def one(v: Tensor) -> Tensor:
            return jvp(f, (x,), (v.reshape(x.shape),))[1]

        return vmap(one, in_dims=1, out_dims=1)(V)

    def _jtu_one(self, x: Tensor, extra: tuple[Tensor, ...], U: Tensor) -> Tensor:
        """``Jᵀ U`` for one sample; ``U`` is ``(m, b)``, result ``(d, b)``."""
        _, pullback = vjp(lambda z: self._flat_fn(z, *extra), x)
        return vmap(lambda u: pullback(u)[0].reshape(-1), in_dims=1, out_dims=1)(U)

    # -- batching with a fallback -----------------------------------------------------------------------
    def _apply(self, per_sample: Callable[..., Tensor], block: Tensor) -> Tensor:
        if self._vectorize is not False and self.fallback_reason is None:
            try:
                with self._context():
                    return vmap(lambda x, e, b: per_sample(x, e, b))(self.inputs, self.extra, block)
            except Exception as exc:  # vmap unsupported by some layer: fall back, say so once
                if self._vectorize is True:
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                warnings.warn(
                    f"invdefend.{self.name}: torch.func.vmap cannot batch this model over samples "
                    f"({self.fallback_reason}); using a per-sample loop (slower, same result)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        try:
            with self._context():
                outs = [
                    per_sample(self.inputs[i], tuple(e[i] for e in self.extra), block[i])
                    for i in range(self.batch_size)
                ]
        except Exception as exc:  # fails even one sample at a time: name the layer and what to do
            raise self._unsupported(
                exc, lambda: per_sample(self.inputs[0], tuple(e[0] for e in self.extra), block[0])
            ) from exc
        return torch.stack(outs)

    def _unsupported(self, exc: Exception, thunk: Callable[[], object]) -> JacobianError:
        """A :class:`JacobianError` for ``exc`` raised by ``thunk``, naming the failing layer if it can."""
        with self._context():
            where = _locate_failure(getattr(self, "module", None), thunk)
        first_line = (str(exc).splitlines() or [""])[0][:300].rstrip(".")
        return JacobianError(
            f"invdefend.{self.name}: the model cannot be evaluated or differentiated one sample at a time"
            f"{' ' + where if where else ''} (sample shape {self.sample_shape}"
            f"{', target shape ' + str(tuple(self.extra[0].shape[1:])) if self.extra else ''}): "
            f"{type(exc).__name__}: {first_line}. Check that inputs and targets are shaped as in training; "
            "a layer that needs a whole batch (BatchNorm in train mode) needs mode='eval'; a layer without "
            "forward-mode or second-order autograd cannot be assessed on the gradient: assess the embedding "
            "it receives instead (target='embedding' on the layers below it), or replace the layer"
        )

    def _check_block(self, block: Tensor, rows: int, what: str) -> None:
        if block.dim() != 3 or block.shape[0] != self.batch_size or block.shape[1] != rows:
            raise ValueError(
                f"invdefend.{self.name}.{what}: expected a block shaped ({self.batch_size}, {rows}, b), "
                f"got {tuple(block.shape)}"
            )

    def matvec(self, V: Tensor) -> Tensor:
        """``J V`` for every sample: ``(B, d, b) -> (B, m, b)``."""
        self._check_block(V, self.in_dim, "matvec")
        return self._apply(self._jv_one, V.to(self.dtype))

    def rmatvec(self, U: Tensor) -> Tensor:
        """``Jᵀ U`` for every sample: ``(B, m, b) -> (B, d, b)``."""
        self._check_block(U, self.out_dim, "rmatvec")
        return self._apply(self._jtu_one, U.to(self.dtype))

    def values(self) -> Tensor:
        """``F(x)`` for every sample, flattened: ``(B, m)``."""
        with self._context():
            return torch.stack(
                [self._flat_fn(self.inputs[i], *(e[i] for e in self.extra)) for i in range(self.batch_size)]
            ).detach()

    def dense(self, chunk: int = 256) -> Tensor:
        """The full Jacobian ``(B, m, d)``, from ``min(m, d)`` products in chunks. For tests and small ``J``.

        Uses ``m`` VJPs when the output is the smaller side (embeddings), else ``d`` JVPs.
        """
        by_rows = self.out_dim < self.in_dim
        n = self.out_dim if by_rows else self.in_dim
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        parts = []
        for start in range(0, n, chunk):
            block = eye[:, start : start + chunk].expand(self.batch_size, -1, -1)
            parts.append(self.rmatvec(block).transpose(1, 2) if by_rows else self.matvec(block))
        return torch.cat(parts, dim=1 if by_rows else 2)

    def subset(self, index: Tensor | list[int]) -> "JacobianOperator":
        """The same operator restricted to some samples of the batch."""
        idx = torch.as_tensor(index, dtype=torch.long)
        sub = JacobianOperator.__new__(JacobianOperator)
        sub.__dict__.update(self.__dict__)
        sub.inputs = self.inputs[idx]
        sub.extra = tuple(e[idx] for e in self.extra)
        sub.batch_size = int(idx.numel())
        return sub

    def __repr__(self) -> str:
        return f"JacobianOperator({self.name}, B={self.batch_size}, m={self.out_dim}, d={self.in_dim})"


def _fresh(buffers: dict[str, Tensor], mode: Mode) -> dict[str, Tensor]:
    """Buffers for one evaluation. In train mode layers update buffers in place (BatchNorm's running
    statistics), which function transforms only allow on tensors created inside the transform: give each
    evaluation its own copies, so nothing of the user's model (or of other evaluations) is mutated."""
    if mode == "train":
        return {k: v.clone() for k, v in buffers.items()}
    return buffers


def gradient_jacobian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    mode: Mode = "eval",
    vectorize: bool | Literal["auto"] = "auto",
) -> JacobianOperator:
    """The Jacobian of each sample's parameter gradient with respect to its input.

    ``F(x_i) = ∇θ loss_fn(model(x_i[None]), y_i[None])`` flattened over the trainable parameters in
    registration order (``m`` = number of trainable parameters). Parameters are detached snapshots taken
    now; the model is not modified.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to outputs.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean reduction, as in training).
        inputs: ``(B, ...)`` floating-point batch.
        targets: ``(B, ...)`` per-sample targets (labels are assumed known to the attacker).
        mode: evaluate the model in ``"eval"`` (default) or ``"train"`` mode; see the module docstring.
        vectorize: see :class:`JacobianOperator`.
    """
    _check_mode("gradient_jacobian", mode)
    check_inputs("gradient_jacobian", inputs)
    check_dtypes("gradient_jacobian", model, inputs)
    if not isinstance(targets, Tensor):
        raise TypeError(f"invdefend.gradient_jacobian: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"invdefend.gradient_jacobian: {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
            "pass one target per input"
        )
    params = {k: v.detach() for k, v in trainable_parameters(model).items()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def loss_of(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **frozen}, _fresh(buffers, mode)), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grad_fn = grad(loss_of)

    def per_sample_gradient(x: Tensor, y: Tensor) -> Tensor:
        g = grad_fn(params, x, y)
        return torch.cat([g[k].reshape(-1) for k in params])

    return JacobianOperator(
        per_sample_gradient,
        inputs,
        (targets,),
        vectorize=vectorize,
        name="gradient_jacobian",
        context=lambda: module_mode(model, mode),
        module=model,
    )


def embedding_jacobian(
    bottom: nn.Module,
    inputs: Tensor,
    *,
    mode: Mode = "eval",
    vectorize: bool | Literal["auto"] = "auto",
) -> JacobianOperator:
    """The Jacobian of each sample's cut-layer embedding ``h(x_i) = bottom(x_i[None])`` w.r.t. ``x_i``.

    ``bottom`` is the client's part of a split model (everything up to the cut layer); ``m`` is the
    embedding size. Parameters and buffers are detached snapshots; the module is not modified.
    """
    _check_mode("embedding_jacobian", mode)
    check_inputs("embedding_jacobian", inputs)
    check_dtypes("embedding_jacobian", bottom, inputs)
    params = {k: v.detach() for k, v in bottom.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in bottom.named_buffers()}

    def embed(x: Tensor) -> Tensor:
        return functional_call(bottom, (params, _fresh(buffers, mode)), (x.unsqueeze(0),))

    return JacobianOperator(
        embed,
        inputs,
        (),
        vectorize=vectorize,
        name="embedding_jacobian",
        context=lambda: module_mode(bottom, mode),
        module=bottom,
    )
