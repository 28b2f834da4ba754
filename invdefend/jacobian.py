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
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .heap import with_heap_reuse

__all__ = [
    "JacobianOperator",
    "JacobianError",
    "gradient_jacobian",
    "batch_gradient_jacobian",
    "batch_statistics",
    "training_batch_norms",
    "embedding_jacobian",
    "trainable_parameters",
    "select_parameters",
    "check_inputs",
    "check_dtypes",
    "module_mode",
    "estimator_context",
    "find_module",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Memory one vmapped product call may use for its block columns' intermediates (estimated by
#: :attr:`JacobianOperator.column_bytes`); larger blocks are split into chunks of samples and columns.
CHUNK_BYTES: int = 512 * 2**20
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


#: What ``params=`` accepts: parameter names (as in ``model.named_parameters()``), module names, or modules.
ParamSpec = Iterable[str | nn.Module] | str | nn.Module


def select_parameters(model: nn.Module, params: ParamSpec, where: str = "gradient_jacobian") -> list[str]:
    """The names of the trainable parameters ``params`` chooses, in registration order (THEORY §10.6).

    Each item is a parameter name as in ``model.named_parameters()``, a submodule's qualified name, or a
    submodule; a module contributes its trainable parameters. A single name or module may be given alone.
    Raises :class:`ValueError` listing every unknown name, naming frozen parameters asked for by name and
    modules without a trainable parameter, and for an empty choice."""
    items = [params] if isinstance(params, (str, nn.Module)) else list(params)
    if not items:
        raise ValueError(f"invdefend.{where}: params chooses nothing; name at least one parameter or module "
                         "(e.g. params=['classifier'])")
    trainable = trainable_parameters(model)
    found = [_parameters_of(model, item, where) for item in items]
    unknown = [item for item, names in zip(items, found) if names is None]
    if unknown:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(f"invdefend.{where}: {type(model).__name__} has no parameter or module named "
                         f"{', '.join(map(repr, unknown))}; give names from model.named_parameters() or "
                         f"model.named_modules() (its top-level modules are {tops})")
    chosen = set().union(*found)
    frozen = sorted(chosen - set(trainable))
    if frozen:
        raise ValueError(f"invdefend.{where}: params names frozen parameters {frozen} (requires_grad=False): "
                         "their gradient is not shared; choose trainable ones")
    return [name for name in trainable if name in chosen]


def _parameters_of(model: nn.Module, item: str | nn.Module, where: str) -> set[str] | None:
    """The model-level parameter names one ``params`` item stands for (a module's: its trainable ones, at
    least one); ``None`` for a name the model does not have."""
    own = dict(model.named_parameters())
    if isinstance(item, str) and item in own:
        return {item}
    if isinstance(item, str):
        module = dict(model.named_modules()).get(item)
        if module is None:
            return None
    elif isinstance(item, nn.Module):
        module = item
        if all(m is not item for m in model.modules()):
            raise ValueError(f"invdefend.{where}: params holds a {type(item).__name__} that is not a submodule of "
                             f"{type(model).__name__}; pass the model's own modules or their names")
    else:
        raise TypeError(f"invdefend.{where}: params items must be parameter or module names (str) or modules, "
                        f"got {type(item).__name__}")
    by_id = {id(p): n for n, p in own.items()}
    names = {by_id[id(p)] for p in module.parameters() if p.requires_grad}
    if not names:
        label = item if isinstance(item, str) else type(item).__name__
        raise ValueError(f"invdefend.{where}: module {label!r} has no trainable parameter; choose a module "
                         "whose gradient is shared")
    return names


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


@contextlib.contextmanager
def estimator_context(module: nn.Module, mode: Mode) -> Iterator[None]:
    """What every estimator evaluation runs in: :func:`module_mode`, and scaled-dot-product attention on its
    math backend (the fused CPU/GPU kernels have no forward-mode derivative, so a stock
    ``nn.TransformerEncoder`` could not be differentiated forward-over-reverse). The user's own backend
    selection is restored on exit; the math kernel computes the same function."""
    with module_mode(module, mode), _math_attention():
        yield


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no backend selection (and no fused CPU kernel)
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def find_module(where: str, model: nn.Module, module: str | nn.Module) -> nn.Module:
    """``module`` if it is a submodule of ``model`` (or its qualified name in ``model``), else a clear error."""
    names = {m: n for n, m in model.named_modules()}
    if isinstance(module, nn.Module):
        if module not in names:
            raise ValueError(f"invdefend.{where}: the given {type(module).__name__} is not a submodule of "
                             f"{type(model).__name__}; pass the module the model itself calls (or its name)")
        return module
    if not isinstance(module, str):
        raise TypeError(f"invdefend.{where}: name the embedding module by its qualified name in the model or "
                        f"pass the module, got {type(module).__name__}")
    try:
        return model.get_submodule(module)
    except AttributeError:
        offered = [n for n, m in model.named_modules() if n and isinstance(m, nn.Embedding)]
        hint = f"its embedding modules are {offered}" if offered else \
            f"its modules are {[n for n, _ in model.named_modules() if n][:12]}"
        raise ValueError(f"invdefend.{where}: {type(model).__name__} has no submodule {module!r}; {hint}") from None


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
            "For token ids on a gradient, name the embedding module (GradientDefense(model, loss, "
            "embedding_module='embed'), or embedding_module= of gradient_jacobian/estimate_gradient_spectrum): the "
            "Jacobian is then taken with respect to its output, and the embedding table's gradient is covered too"
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
        value_fn: what :meth:`values` reports for a sample (same arguments as ``fn``; default ``fn``): the
            size of the sample's own shared quantity when ``fn`` carries more (the batch Jacobian's whole
            batch gradient).

    Attributes:
        chunk_bytes: the memory one vmapped product call may use (default :data:`CHUNK_BYTES`); larger
            blocks run in chunks of samples and columns, same result.
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
        value_fn: Callable[..., Tensor] | None = None,
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
        self.chunk_bytes = CHUNK_BYTES
        self._value_fn = value_fn or fn

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
    @with_heap_reuse
    def _apply(self, per_sample: Callable[..., Tensor], block: Tensor) -> Tensor:
        """``per_sample(x_i, extra_i, block_i)`` for every sample, stacked; vmapped over samples, in chunks
        of samples and block columns small enough that one chunk's intermediates (each column carries
        ``m``-sized gradients and their tangents) stay within :attr:`chunk_bytes`."""
        B, b = self.batch_size, int(block.shape[2])
        columns = max(1, self.chunk_bytes // max(self.column_bytes, 1))  # columns one call may carry
        if B * b <= columns:
            return self._apply_chunk(per_sample, slice(0, B), block)
        if b <= columns:  # whole blocks, a few samples at a time
            group = max(1, columns // b)
            return torch.cat([self._apply_chunk(per_sample, slice(i, i + group), block[i : i + group])
                              for i in range(0, B, group)])
        outs = []
        for i in range(B):  # one sample at a time, its columns in chunks
            cols = [self._apply_chunk(per_sample, slice(i, i + 1), block[i : i + 1, :, c : c + columns])
                    for c in range(0, b, columns)]
            outs.append(torch.cat(cols, dim=2))
        return torch.cat(outs)

    @property
    def column_bytes(self) -> int:
        """Memory one block column costs in a product, estimated (the ``m``-sized output, the gradient
        and its tangent): what :attr:`chunk_bytes` is divided by."""
        return 3 * max(self.out_dim, self.in_dim) * torch.empty((), dtype=self.dtype).element_size()

    def _apply_chunk(self, per_sample: Callable[..., Tensor], rows: slice, block: Tensor) -> Tensor:
        inputs, extra = self.inputs[rows], tuple(e[rows] for e in self.extra)
        if self._vectorize is not False and self.fallback_reason is None:
            try:
                with self._context():
                    return vmap(lambda x, e, b: per_sample(x, e, b))(inputs, extra, block)
            except Exception as exc:  # vmap unsupported by some layer: fall back, say so once
                if self._vectorize is True:
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                warnings.warn(
                    f"invdefend.{self.name}: torch.func.vmap cannot batch this model over samples "
                    f"({self.fallback_reason}); using a per-sample loop (slower, same result)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        try:
            with self._context():
                outs = [per_sample(inputs[i], tuple(e[i] for e in extra), block[i]) for i in range(inputs.shape[0])]
        except Exception as exc:  # fails even one sample at a time: name the layer and what to do
            raise self._unsupported(
                exc, lambda: per_sample(inputs[0], tuple(e[0] for e in extra), block[0])
            ) from exc
        return torch.stack(outs)

    def _unsupported(self, exc: Exception, thunk: Callable[[], object]) -> JacobianError:
        """A :class:`JacobianError` for ``exc`` raised by ``thunk``, naming the failing layer if it can."""
        with self._context():
            where = _locate_failure(getattr(self, "module", None), thunk)
        first_line = (str(exc).splitlines() or [""])[0][:300].rstrip(".")
        # BatchNorm advice only where a BatchNorm layer failed (or one may have, after the forward pass).
        batch_norm = "a layer that needs a whole batch (BatchNorm in train mode) needs mode='eval'; " \
            if "BatchNorm" in where else ""
        return JacobianError(
            f"invdefend.{self.name}: the model cannot be evaluated or differentiated one sample at a time"
            f"{' ' + where if where else ''} (sample shape {self.sample_shape}"
            f"{', target shape ' + str(tuple(self.extra[0].shape[1:])) if self.extra else ''}): "
            f"{type(exc).__name__}: {first_line}. Check that inputs and targets are shaped as in training; "
            f"{batch_norm}a layer without forward-mode or second-order autograd cannot be assessed on the "
            "gradient: assess the embedding it receives instead (target='embedding' on the layers below it), "
            "or replace the layer"
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

    def gram_matvec(self, V: Tensor) -> Tensor:
        """``JᵀJ V`` for every sample: ``(B, d, b) -> (B, d, b)``, without holding ``J V`` for more than one
        chunk of columns (:attr:`chunk_bytes`): the memory-lean product of large models."""
        self._check_block(V, self.in_dim, "gram_matvec")

        def normal(x: Tensor, extra: tuple[Tensor, ...], block: Tensor) -> Tensor:
            return self._jtu_one(x, extra, self._jv_one(x, extra, block))

        return self._apply(normal, V.to(self.dtype))

    def values(self) -> Tensor:
        """``F(x)`` for every sample, flattened: ``(B, m)``."""
        with self._context():
            return torch.stack(
                [self._value_fn(self.inputs[i], *(e[i] for e in self.extra)).reshape(-1)
                 for i in range(self.batch_size)]
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
    embedding_module: str | nn.Module | None = None,
    buffers: dict[str, Tensor] | None = None,
    params: ParamSpec | None = None,
    dtype: torch.dtype | None = None,
) -> JacobianOperator:
    """The Jacobian of each sample's parameter gradient with respect to its input.

    ``F(x_i) = ∇θ loss_fn(model(x_i[None]), y_i[None])`` flattened over the trainable parameters in
    registration order (``m`` = number of trainable parameters). Parameters are detached snapshots taken
    now; the model is not modified.

    Token ids (``embedding_module``): the input is then the output ``e_i`` of that module (an
    ``nn.Embedding``, or any module the model calls once per forward, e.g. token plus position embeddings),
    and ``F(e_i)`` is the whole parameter gradient as a function of it — the embedding table's gradient
    included, whose rows are ``∂ℓ/∂e_i`` scattered onto the sample's tokens. ``inputs`` are what the model
    takes (token ids); the operator's points (:attr:`JacobianOperator.inputs`) are their embeddings.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to outputs.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean reduction, as in training).
        inputs: ``(B, ...)`` floating-point batch (any dtype with ``embedding_module``).
        targets: ``(B, ...)`` per-sample targets (labels are assumed known to the attacker).
        mode: evaluate the model in ``"eval"`` (default) or ``"train"`` mode; see the module docstring.
        vectorize: see :class:`JacobianOperator`.
        embedding_module: the submodule (or its name) whose output the Jacobian is taken with respect to.
        buffers: buffer values to evaluate with instead of the model's own, by name (e.g.
            :func:`batch_statistics`: train-mode BatchNorm on the batch's statistics, held as constants).
        params: only the gradient of these parameters (names, module names or modules;
            :func:`select_parameters`): the operator's rows are theirs, in registration order, the other
            parameters held as constants. A subset alone under-states the risk; :mod:`invdefend.subset` bounds
            what the rest adds (THEORY §10.6).
        dtype: evaluate in this floating dtype instead of the model's: parameters, buffers and inputs (or, with
            ``embedding_module``, their embeddings) are cast copies, the model is not modified. ``torch.float64``
            is the defenses' retry when a float32 estimate is not trusted (round-off: a confidently classified
            sample's gradient is a difference of nearly equal terms).
    """
    _check_mode("gradient_jacobian", mode)
    cast = _caster("gradient_jacobian", dtype)
    if embedding_module is None:
        check_inputs("gradient_jacobian", inputs)
    elif not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("invdefend.gradient_jacobian: inputs must be a non-empty batch tensor shaped (B, ...)")
    check_dtypes("gradient_jacobian", model, inputs)
    if not isinstance(targets, Tensor):
        raise TypeError(f"invdefend.gradient_jacobian: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"invdefend.gradient_jacobian: {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
            "pass one target per input"
        )
    chosen = trainable_parameters(model)
    if params is not None:
        chosen = {k: chosen[k] for k in select_parameters(model, params)}
    own = dict(model.named_buffers())
    unknown = sorted(set(buffers or {}) - set(own))
    if unknown:
        raise ValueError(f"invdefend.gradient_jacobian: {type(model).__name__} has no buffers {unknown}")
    live = {k: cast(v.detach()) for k, v in chosen.items()}
    frozen = {k: cast(v.detach()) for k, v in model.named_parameters() if k not in live}
    buffers = {k: cast((buffers or {}).get(k, v).detach().clone()) for k, v in own.items()}
    context = lambda: estimator_context(model, mode)

    def call(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, ({**p, **frozen}, _fresh(buffers, mode)), (x.unsqueeze(0),))

    if embedding_module is None:

        def loss_of(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(call(p, x), y.unsqueeze(0))

        return JacobianOperator(_flat_gradient(loss_of, live), cast(inputs), (targets,), vectorize=vectorize,
                                name="gradient_jacobian", context=context, module=model)

    embed = find_module("gradient_jacobian", model, embedding_module)
    embedded = cast(_module_outputs(model, embed, inputs, context))

    def embedded_loss(p: dict[str, Tensor], e: Tensor, ids: Tensor, y: Tensor) -> Tensor:
        def substitute(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            # value e (what the Jacobian is taken with respect to); the table's own gradient still flows
            # through ``out``, so the released table rows are part of F(e)
            return out - out.detach() + e.unsqueeze(0)

        handle = embed.register_forward_hook(substitute)
        try:
            return loss_fn(call(p, ids), y.unsqueeze(0))
        finally:
            handle.remove()

    return JacobianOperator(_flat_gradient(embedded_loss, live), embedded, (inputs, targets), vectorize=vectorize,
                            name="gradient_jacobian", context=context, module=model)


def _caster(where: str, dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """``t -> t`` in ``dtype`` when ``t`` is floating point (unchanged when ``dtype`` is None); refuses a
    non-floating ``dtype``."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"invdefend.{where}: dtype={dtype} must be a floating-point dtype")
    return lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _flat_gradient(loss_of: Callable[..., Tensor], params: dict[str, Tensor]) -> Callable[..., Tensor]:
    """``(*args) -> ∇_p loss_of(p, *args)`` at ``params``, flattened in their order: the per-sample function a
    gradient operator differentiates."""
    grad_fn = grad(loss_of)

    def flat(*args: Tensor) -> Tensor:
        g = grad_fn(params, *args)
        return torch.cat([g[k].reshape(-1) for k in params])

    return flat


def _module_outputs(model: nn.Module, module: nn.Module, inputs: Tensor,
                    context: Callable[[], contextlib.AbstractContextManager]) -> Tensor:
    """What ``module`` outputs, per sample, when ``model`` runs on ``inputs`` (in the estimator's mode)."""
    seen: list[object] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with context(), torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(seen[0], Tensor):
        raise JacobianError(
            f"invdefend.gradient_jacobian: the embedding module ({type(module).__name__}) must be called exactly "
            f"once per forward and return one tensor; it was called {len(seen)} time(s)"
            + ("" if not seen or isinstance(seen[0], Tensor) else f" and returned {type(seen[0]).__name__}")
        )
    out = seen[0]
    if out.shape[:1] != inputs.shape[:1] or not out.is_floating_point():
        raise JacobianError(
            f"invdefend.gradient_jacobian: the embedding module returned {tuple(out.shape)} ({out.dtype}) for "
            f"{inputs.shape[0]} inputs; it must return one floating-point embedding per sample"
        )
    return out.detach()


def training_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers in train mode that normalise with the batch's statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


@contextlib.contextmanager
def _batch_statistics(model: nn.Module, norms: list[nn.Module]) -> Iterator[None]:
    """Eval mode (dropout off) except ``norms``, which normalise with the batch's statistics without updating
    their running statistics (``track_running_stats`` off for the duration: nothing is written in place, so
    the evaluation can be vmapped, and the user's buffers are untouched); all flags restored on exit."""
    saved = [(m, m.track_running_stats) for m in norms]
    with estimator_context(model, "eval"):
        for m in norms:
            m.train(True)
            m.track_running_stats = False
        try:
            yield
        finally:
            for m, flag in saved:
                m.track_running_stats = flag


def batch_statistics(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The mean and (biased) variance each train-mode BatchNorm layer normalises ``inputs`` with, as
    ``{"<layer>.running_mean": ..., "<layer>.running_var": ...}``: passed as ``buffers=`` to
    :func:`gradient_jacobian` (eval mode), each sample's Jacobian is that of the network training runs on
    this batch with the statistics held fixed — it leaves out only how the sample moves the statistics, a
    ``1/B`` share of each layer's (``batch_norm="frozen"`` of the defense; :func:`batch_gradient_jacobian`
    keeps it). One forward of the batch, without gradients; the running statistics are not updated."""
    norms = training_batch_norms(model)
    names = {m: n for n, m in model.named_modules()}
    stats: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        dims = [0] + list(range(2, x.dim()))
        stats[f"{names[module]}.running_mean"] = x.mean(dim=dims)
        stats[f"{names[module]}.running_var"] = x.var(dim=dims, unbiased=False)

    handles = [m.register_forward_pre_hook(keep) for m in norms]
    try:
        with _batch_statistics(model, norms), torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def batch_gradient_jacobian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    index: Tensor | list[int],
    *,
    vectorize: bool | Literal["auto"] = "auto",
    dtype: torch.dtype | None = None,
) -> JacobianOperator:
    """The Jacobian of the gradient a batch actually releases with respect to one of its samples, for models
    whose BatchNorm layers normalise with batch statistics (as they do in training).

    For each sample ``i`` in ``index``, ``F_i(x) = B·∇θ loss_fn(model(X[i←x]), Y)``: the whole batch's
    gradient (times ``B``, the per-sample units of :func:`gradient_jacobian`) with ``x`` in place of the
    ``i``-th sample and the rest of the batch held fixed. Its Jacobian includes how ``x`` moves every other
    sample's term through the batch statistics; without BatchNorm it equals the per-sample one. BatchNorm
    layers in train mode use the batch's statistics (running statistics are neither used nor updated), every
    other layer runs in eval mode (dropout off). Each product runs a forward and backward of the whole batch.
    :meth:`~JacobianOperator.values` reports the sample's own gradient term (what the reference precision is
    relative to), not the whole batch's.

    Args:
        model, loss_fn: as in :func:`gradient_jacobian` (mean reduction).
        inputs, targets: the whole batch ``(B, ...)``.
        index: the samples whose Jacobians the operator holds.
        vectorize: see :class:`JacobianOperator`.
        dtype: evaluate in this floating dtype (cast copies), as in :func:`gradient_jacobian`.
    """
    check_inputs("batch_gradient_jacobian", inputs)
    check_dtypes("batch_gradient_jacobian", model, inputs)
    if not isinstance(targets, Tensor) or targets.shape[0] != inputs.shape[0]:
        raise ValueError("invdefend.batch_gradient_jacobian: pass one target per input (a tensor shaped (B, ...))")
    idx = torch.as_tensor(index, dtype=torch.long, device=inputs.device)
    B = int(inputs.shape[0])
    if idx.dim() != 1 or idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= B:
        raise ValueError(f"invdefend.batch_gradient_jacobian: index must list samples of the batch (0..{B - 1}), "
                         f"got {idx.tolist()}")
    cast = _caster("batch_gradient_jacobian", dtype)
    params = {k: cast(v.detach()) for k, v in trainable_parameters(model).items()}
    frozen = {k: cast(v.detach()) for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: cast(v.detach()) for k, v in model.named_buffers()}
    X, Y = cast(inputs.detach()), targets.detach()
    norms = training_batch_norms(model)
    positions = torch.arange(B, device=X.device)

    def batch_output(p: dict[str, Tensor], x: Tensor, i: Tensor) -> Tensor:
        """The whole batch's output with ``x`` in place of sample ``i``."""
        mask = (positions == i).reshape((B,) + (1,) * x.dim())
        return functional_call(model, ({**p, **frozen}, buffers), (torch.where(mask, x.unsqueeze(0), X),))

    def batch_loss(p: dict[str, Tensor], x: Tensor, i: Tensor) -> Tensor:
        return loss_fn(batch_output(p, x, i), Y) * B

    def own_loss(p: dict[str, Tensor], x: Tensor, i: Tensor) -> Tensor:
        return loss_fn(batch_output(p, x, i)[i].unsqueeze(0), Y[i].unsqueeze(0))

    gradient_of_batch = _flat_gradient(batch_loss, params)
    # the sample's own term, for the size of what it shares (the reference precision is relative to it)
    own_gradient = _flat_gradient(own_loss, params)

    return JacobianOperator(gradient_of_batch, X[idx], (idx,), vectorize=vectorize,
                            name="batch_gradient_jacobian", context=lambda: _batch_statistics(model, norms),
                            module=model, value_fn=own_gradient)


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
        context=lambda: estimator_context(bottom, mode),
        module=bottom,
    )
