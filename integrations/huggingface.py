"""A Hugging Face ``TrainerCallback`` that protects every optimizer step with :class:`~invdefend.GradientDefense`.

Two added lines in a ``Trainer`` script::

    from invdefend.integrations.huggingface import GradientDefenseCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradientDefenseCallback(input_key="pixel_values")])

Where the noise lands (transformers 5.x, ``Trainer._inner_training_loop``): after the last micro-batch's
backward the Trainer clips to ``args.max_grad_norm``, calls ``on_pre_optimizer_step``, then
``optimizer.step()``. The callback adds its noise in ``on_pre_optimizer_step``, so the released gradient is
``clip(g) + δ``: the clip never shrinks the noise.

What the defense differentiates: the Trainer calls ``model(**batch)``; a forward pre-hook (with keyword
arguments) on the model keeps ``batch[input_key]`` and ``batch[label_key]`` of every training micro-batch
since ``on_step_begin`` (so gradient accumulation hands the full effective batch to the defense). The
per-sample gradient Jacobian is taken of ``loss_fn(forward_fn(model, x), y)`` with ``forward_fn`` defaulting
to ``model(**{input_key: x})[output_key]`` and ``loss_fn`` to mean cross-entropy — the same loss the model
computes from ``labels`` for classification. Other inputs of the batch (an ``attention_mask``, ...) are not
passed; models that need them per sample are outside this adapter.

Token ids: the Jacobian needs floating-point inputs. Pass ``prepare_inputs=lambda model, ids:
model.get_input_embeddings()(ids)`` and ``forward_fn=lambda model, e: model(inputs_embeds=e)``: the risk
is then measured and the noise shaped with respect to the input embeddings. The embedding table's own
gradient (non-zero exactly on the rows of the tokens that occur) is not reached by that Jacobian; only the
isotropic ``floor`` (half of ``budget`` by default) reaches it, and a plan without one is never released
(the step goes out under fallback noise and says which parameter was left bare). Every parameter the
Trainer's optimizer steps must belong to the defended model, or the step refuses
(:meth:`~invdefend.GradientDefense.check_coverage`). Outside the Trainer, ``GradientDefense(model, loss,
embedding_module=...)`` takes the Jacobian through the table as well.

Logging: at every Trainer log (``logging_steps``) the latest record's scalars (``invdefend/gradient/...``)
are added to the log dict and to ``state.log_history``; callbacks after this one (the printer, progress
bar) show them. Reporting integrations (``report_to``) run before user callbacks and do not see them; pass
``writer=SummaryWriter(args.logging_dir)`` to write the full RiskMonitor set to TensorBoard.

transformers is imported on first use of :class:`GradientDefenseCallback`, never by ``import invdefend``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from invdefend import DefenseError
from invdefend.defense.gradient import GradientDefense
from invdefend.monitor import ReleaseRecord, record_scalars

__all__ = ["GradientDefenseCallback", "KeywordForward"]


def _select(outputs: Any, key: str) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        if key in outputs:
            return outputs[key]
        raise KeyError(
            f"invdefend.integrations.huggingface: the model's outputs have keys {list(outputs.keys())} but no "
            f"{key!r}; pass output_key= naming the tensor loss_fn expects, or forward_fn="
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"invdefend.integrations.huggingface: cannot take {key!r} from outputs of type {type(outputs).__name__}; "
        "pass forward_fn=lambda model, x: <tensor that loss_fn takes>"
    )


class KeywordForward(nn.Module):
    """``x -> forward_fn(model, x)`` (default ``model(**{input_key: x})[output_key]``) as a module.

    It holds ``model`` as its only submodule, so its trainable parameters are the model's own tensors:
    noise the defense adds to them lands in the Trainer's gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        input_key: str = "pixel_values",
        output_key: str = "logits",
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.input_key = input_key
        self.output_key = output_key
        self.forward_fn = forward_fn

    def forward(self, x: Tensor) -> Tensor:
        """The tensor ``loss_fn`` takes, for a batch of (floating-point) inputs."""
        out = self.forward_fn(self.model, x) if self.forward_fn is not None else self.model(**{self.input_key: x})
        return _select(out, self.output_key)


def _mean_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "invdefend.integrations.huggingface needs transformers >= 4.40: pip install 'invdefend[huggingface]'"
        ) from exc
    return transformers


@functools.cache
def _callback_class() -> type:
    transformers = _require_transformers()

    class GradientDefenseCallback(transformers.TrainerCallback):
        """Adds :class:`~invdefend.GradientDefense` noise to every optimizer step of ``Trainer.train``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean reduction) on what ``forward_fn`` returns;
                default mean cross-entropy over the last dimension.
            input_key: the batch key of the private input (``"pixel_values"``, ``"input_values"``, ...).
            label_key: the batch key of the targets.
            output_key: the output field ``loss_fn`` takes when ``forward_fn`` is not given.
            forward_fn: ``forward_fn(model, inputs) -> outputs`` for the Jacobian (default
                ``model(**{input_key: inputs})``).
            prepare_inputs: ``prepare_inputs(model, captured) -> float inputs`` applied to the captured
                batch before the defense sees it (e.g. token ids to embeddings); default identity.
            log_scalars: add the latest record's scalars to every Trainer training log.
            **defense_kwargs: passed to :class:`~invdefend.GradientDefense` (``budget``, ``target_psnr``,
                ``mechanism``, ``k``, ``probes``, ``refresh_every``, ``seed``, ``writer``, ...).

        Attributes:
            defense: the :class:`~invdefend.GradientDefense`, built at ``on_train_begin``.
            records: the defense's :class:`~invdefend.ReleaseRecord` s (its monitor's bounded history).
            last_batch_size: samples behind the last protected step (all accumulated micro-batches).
        """

        def __init__(
            self,
            loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
            *,
            input_key: str = "pixel_values",
            label_key: str = "labels",
            output_key: str = "logits",
            forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
            prepare_inputs: Callable[[nn.Module, Tensor], Tensor] | None = None,
            log_scalars: bool = True,
            **defense_kwargs: Any,
        ) -> None:
            if "capture" in defense_kwargs:
                raise TypeError(
                    "invdefend.integrations.huggingface: the callback captures batches itself from the "
                    "model's keyword arguments; do not pass capture="
                )
            self.loss_fn = loss_fn if loss_fn is not None else _mean_cross_entropy
            self.input_key, self.label_key, self.output_key = input_key, label_key, output_key
            self.forward_fn = forward_fn
            self.prepare_inputs = prepare_inputs
            self.log_scalars = log_scalars
            self.defense_kwargs = defense_kwargs
            self.defense: GradientDefense | None = None
            self.last_batch_size = 0
            self._model: nn.Module | None = None
            self._hook: torch.utils.hooks.RemovableHandle | None = None
            self._xs: list[Tensor] = []
            self._ys: list[Tensor] = []
            self._missing: str = ""
            self._busy = False

        @property
        def records(self) -> list[ReleaseRecord]:
            """The release records so far (the defense monitor's history: its latest ``max_history``)."""
            return [] if self.defense is None else self.defense.monitor.history

        # -- capture --------------------------------------------------------------------------------------
        def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._busy or not module.training or not torch.is_grad_enabled():
                return  # evaluation passes and the defense's own evaluations are not released batches
            x = kwargs.get(self.input_key, args[0] if args else None)
            y = kwargs.get(self.label_key)
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                self._missing = (
                    f"the model was called without tensors {self.input_key!r} and {self.label_key!r} "
                    f"(keyword arguments: {sorted(kwargs)}); set input_key= and label_key= to the batch keys"
                )
                return
            self._xs.append(x.detach())
            self._ys.append(y.detach())

        def attach(self, model: nn.Module) -> None:
            """Build the defense for ``model`` (once) and install the capture hook."""
            if self._model is not model:
                self.detach()
                self._model = model
                adapter = KeywordForward(model, self.input_key, self.output_key, self.forward_fn)
                self.defense = GradientDefense(adapter, self.loss_fn, capture=False, **self.defense_kwargs)
            if self._hook is None:
                self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

        def detach(self) -> None:
            """Remove the capture hook (the defense and its records stay)."""
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

        # -- Trainer events -------------------------------------------------------------------------------
        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                           **kwargs: Any) -> None:
            """Build the defense and start capturing the model's training batches."""
            if model is None:
                raise ValueError("invdefend.integrations.huggingface: the Trainer passed no model to on_train_begin")
            self.attach(model)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """A new optimizer step (accumulation cycle) starts: forget earlier batches."""
            self._xs, self._ys, self._missing = [], [], ""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Add the defense's noise to the (clipped) gradients, just before ``optimizer.step()``."""
            assert self.defense is not None and self._model is not None
            xs, ys, missing = self._xs, self._ys, self._missing
            self._xs, self._ys, self._missing = [], [], ""
            if not any(p.grad is not None for p in self._model.parameters() if p.requires_grad):
                return  # nothing was back-propagated: nothing is released
            if not xs:
                raise DefenseError(
                    "invdefend.integrations.huggingface: no training batch was captured for this step; "
                    + (missing or "the Trainer's model forward did not run through the model given to the callback")
                )
            inputs, targets = torch.cat(xs), torch.cat(ys)
            if self.prepare_inputs is not None:
                with torch.no_grad():
                    inputs = self.prepare_inputs(self._model, inputs).detach()
            if not inputs.is_floating_point():
                raise DefenseError(
                    f"invdefend.integrations.huggingface: the captured {self.input_key!r} has dtype {inputs.dtype}; "
                    "the Jacobian needs floating-point inputs. For token ids pass prepare_inputs=lambda model, ids: "
                    "model.get_input_embeddings()(ids) and forward_fn=lambda model, e: model(inputs_embeds=e)"
                )
            optimizer = kwargs.get("optimizer")
            if optimizer is not None:  # every parameter the Trainer steps must be one the defense noises
                self.defense.check_coverage((p for g in optimizer.param_groups for p in g["params"]),
                                            "integrations.huggingface")
            self.last_batch_size = int(inputs.shape[0])
            self.defense.capture(inputs, targets)
            self._busy = True
            try:
                self.defense.protect()
            finally:
                self._busy = False

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            """Add the latest record's scalars to a training log (not to evaluation or summary logs)."""
            if not self.log_scalars or logs is None or "loss" not in logs or not self.records:
                return
            scalars = record_scalars(self.records[-1], self.defense.monitor.tag)
            last_risk = next((r for r in reversed(self.records) if r.predicted_psnr), None)
            if last_risk is not None and not self.records[-1].predicted_psnr:
                scalars.update({k: v for k, v in record_scalars(last_risk, self.defense.monitor.tag).items()
                                if "/risk/" in k})
            logs.update(scalars)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(scalars)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Stop capturing (another ``train()`` re-attaches)."""
            self.detach()

    GradientDefenseCallback.__module__ = __name__
    return GradientDefenseCallback


def __getattr__(name: str) -> Any:
    if name == "GradientDefenseCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
