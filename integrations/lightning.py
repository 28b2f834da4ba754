"""A Lightning callback that protects every optimizer step with :class:`~invdefend.GradientDefense`.

Two added lines in a Lightning script::

    from invdefend.integrations.lightning import GradientDefenseCallback
    trainer = pl.Trainer(..., callbacks=[GradientDefenseCallback(nn.CrossEntropyLoss(), budget=0.05)])

The callback builds a ``GradientDefense`` for the ``LightningModule`` (or a submodule chosen by
``module``), collects each training batch's ``(inputs, targets)`` with ``batch_to_xy``, and adds the
defense's noise to the gradients once per optimizer step. With gradient accumulation the defense sees every
micro-batch that contributed to the step, so its per-sample scaling uses the full effective batch.

Where the noise lands (Lightning 2.6, ``plugins/precision/precision.py``): Lightning runs the closure
(``training_step`` + ``backward``), then ``on_before_optimizer_step``, then ``configure_gradient_clipping``,
then the wrapped optimizer's update. ``placement="after_clipping"`` (default) wraps the optimizer so the
noise is added after clipping, immediately before the update; the clip then never shrinks the noise and
the released gradient is ``clip(g) + δ``. ``placement="before_clipping"`` adds the noise in
``on_before_optimizer_step`` without touching the optimizer; a configured clip then acts on ``g + δ``
(norm clipping rescales signal and noise alike; value clipping can cut the noise).

Risk and noise scalars are logged through ``pl_module.log_dict`` to every Lightning logger (keys such as
``invdefend/gradient/risk/predicted_psnr_max``); pass ``writer=SummaryWriter(...)`` to also write the full
:class:`~invdefend.monitor.RiskMonitor` set (histograms included). The defense's state (step, tracked
spectrum, noise generator) is saved in and restored from Lightning checkpoints.

Lightning is imported on first use of :class:`GradientDefenseCallback`, never by ``import invdefend``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from invdefend import DefenseError
from invdefend.defense.gradient import DefendedOptimizer, GradientDefense
from invdefend.monitor import ReleaseRecord, record_scalars  # record_scalars re-exported for compatibility

if TYPE_CHECKING:  # pragma: no cover - typing only
    import lightning.pytorch as pl

__all__ = ["GradientDefenseCallback", "default_batch_to_xy", "record_scalars"]

Placement = Literal["after_clipping", "before_clipping"]


def default_batch_to_xy(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch that is a ``(x, y, ...)`` sequence or a mapping with ``x``/``y`` keys."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("inputs", "targets"), ("input", "target")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    raise TypeError(
        f"invdefend.integrations.lightning: cannot split a batch of type {type(batch).__name__} into "
        "(inputs, targets); pass batch_to_xy=lambda batch: (inputs, targets) to GradientDefenseCallback"
    )


def _require_lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "invdefend.integrations.lightning needs Lightning >= 2.2: pip install 'invdefend[lightning]'"
        ) from exc
    return pl


class _StepWrapper(DefendedOptimizer):
    """Runs Lightning's closure (forward, backward, hooks, clipping), lets the callback release, then steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, defense: GradientDefense, release: Callable[[], None]):
        super().__init__(optimizer, defense)
        self._release = release

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Run the closure, add the defense's noise, step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_coverage()
        self._release()
        self.original_optimizer.step()
        return loss


@functools.cache
def _callback_class() -> type:
    pl = _require_lightning()

    class GradientDefenseCallback(pl.Callback):
        """Adds :class:`~invdefend.GradientDefense` noise to every optimizer step of a ``Trainer.fit``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> scalar`` with mean reduction, where ``outputs`` is what
                the defended module returns for a batch of inputs (the loss of the training step).
            batch_to_xy: maps a training batch to ``(inputs, targets)`` (default: ``batch[0], batch[1]``).
            module: picks the defended module from the ``LightningModule`` (default: the module itself,
                whose ``forward(inputs)`` must return ``outputs``). Every trainable parameter of the
                ``LightningModule`` must belong to it, otherwise its gradient would leave unprotected.
            placement: ``"after_clipping"`` (default) or ``"before_clipping"``; see the module docstring.
            log_scalars: log the record's scalars with ``pl_module.log_dict`` after every protected step.
            **defense_kwargs: passed to :class:`~invdefend.GradientDefense` (``budget``, ``target_psnr``,
                ``mechanism``, ``k``, ``probes``, ``refresh_every``, ``seed``, ``writer``, ...).

        Attributes:
            defense: the :class:`~invdefend.GradientDefense`, built at ``setup``.
            records: the defense's :class:`~invdefend.ReleaseRecord` s (its monitor's bounded history).
            last_batch_size: samples behind the last protected step (all micro-batches of an accumulated step).
        """

        def __init__(
            self,
            loss_fn: Callable[[Tensor, Tensor], Tensor],
            *,
            batch_to_xy: Callable[[Any], tuple[Tensor, Tensor]] = default_batch_to_xy,
            module: Callable[["pl.LightningModule"], nn.Module] | None = None,
            placement: Placement = "after_clipping",
            log_scalars: bool = True,
            **defense_kwargs: Any,
        ) -> None:
            super().__init__()
            if placement not in ("after_clipping", "before_clipping"):
                raise ValueError(
                    f"invdefend.integrations.lightning: placement={placement!r}; choose 'after_clipping' "
                    "(noise after Lightning's gradient clipping) or 'before_clipping' (noise in "
                    "on_before_optimizer_step)"
                )
            if "capture" in defense_kwargs:
                raise TypeError(
                    "invdefend.integrations.lightning: the callback captures batches itself through "
                    "batch_to_xy; do not pass capture="
                )
            self.loss_fn = loss_fn
            self.batch_to_xy = batch_to_xy
            self.module_fn = module
            self.placement = placement
            self.log_scalars = log_scalars
            self.last_batch_size = 1
            self.defense_kwargs = defense_kwargs
            self.defense: GradientDefense | None = None
            self._pending_state: dict[str, Any] | None = None
            self._xs: list[Tensor] = []
            self._ys: list[Tensor] = []
            self._logged: ReleaseRecord | None = None
            self._wrapped: list[tuple[int, torch.optim.Optimizer]] = []

        @property
        def records(self) -> list[ReleaseRecord]:
            """The release records so far (the defense monitor's history: its latest ``max_history``)."""
            return [] if self.defense is None else self.defense.monitor.history

        # -- set-up ---------------------------------------------------------------------------------------
        def _defended_module(self, pl_module: "pl.LightningModule") -> nn.Module:
            target = pl_module if self.module_fn is None else self.module_fn(pl_module)
            if not isinstance(target, nn.Module):
                raise TypeError(
                    f"invdefend.integrations.lightning: module(pl_module) returned {type(target).__name__}; "
                    "it must return the nn.Module whose forward maps inputs to loss_fn's outputs"
                )
            inside = {id(p) for p in target.parameters()}
            missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in inside]
            if missing:
                raise ValueError(
                    f"invdefend.integrations.lightning: trainable parameters {missing[:5]} of "
                    f"{type(pl_module).__name__} are outside the defended module, so their gradients would "
                    "be released without noise; choose module= to cover them or freeze them"
                )
            return target

        def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
            """Build the defense for the module when fitting starts (kept across fits of the same module)."""
            if stage != "fit":
                return
            target = self._defended_module(pl_module)
            if self.defense is not None and self.defense.model is target:
                return  # a further fit of the same module keeps the defense's state
            self.defense = GradientDefense(target, self.loss_fn, capture=False, **self.defense_kwargs)
            self._logged = None
            if self._pending_state is not None:
                self.defense.load_state_dict(self._pending_state)
                self._pending_state = None

        def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
            """With ``placement="after_clipping"``, wrap the strategy's optimizers."""
            if self.placement != "after_clipping":
                return
            assert self.defense is not None
            optimizers = list(trainer.strategy.optimizers)
            if not optimizers:
                return
            self._wrapped = [(i, opt) for i, opt in enumerate(optimizers) if not isinstance(opt, _StepWrapper)]
            for i, opt in self._wrapped:
                optimizers[i] = _StepWrapper(opt, self.defense, self._release)
            trainer.strategy.optimizers = optimizers

        def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
            """Give the strategy its own optimizers back."""
            if self._wrapped:
                optimizers = list(trainer.strategy.optimizers)
                for i, opt in self._wrapped:
                    optimizers[i] = opt
                trainer.strategy.optimizers = optimizers
                self._wrapped = []
            self._xs, self._ys = [], []

        def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                         exception: BaseException) -> None:
            """Unwrap the optimizers when ``fit`` fails, too."""
            self.on_fit_end(trainer, pl_module)

        # -- per batch ------------------------------------------------------------------------------------
        def on_train_batch_start(
            self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
        ) -> None:
            """Keep the batch's ``(inputs, targets)``; a micro-batch of an accumulated step is appended."""
            x, y = self.batch_to_xy(batch)
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    "invdefend.integrations.lightning: batch_to_xy must return two tensors (inputs, targets), "
                    f"got ({type(x).__name__}, {type(y).__name__})"
                )
            self._xs.append(x.detach())
            self._ys.append(y.detach())

        def on_before_optimizer_step(
            self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
        ) -> None:
            """With ``before_clipping``, add the noise now (before Lightning's gradient clipping)."""
            if self.placement == "before_clipping":
                self._release()

        def _release(self) -> None:
            assert self.defense is not None
            xs, ys = self._xs, self._ys
            self._xs, self._ys = [], []
            if not any(p.grad is not None for p in self.defense.model.parameters() if p.requires_grad):
                return  # training_step returned None: no gradient, nothing released
            if not xs:
                raise DefenseError(
                    "invdefend.integrations.lightning: the optimizer stepped with gradients but no training "
                    "batch was seen since the last step (on_train_batch_start did not run); nothing was released"
                )
            inputs, targets = torch.cat(xs), torch.cat(ys)
            self.last_batch_size = int(inputs.shape[0])
            self.defense.capture(inputs, targets)
            self.defense.protect()

        def on_train_batch_end(
            self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
            batch_idx: int,
        ) -> None:
            """Log the scalars of the records released since the last call."""
            if not self.log_scalars or self.defense is None:
                return
            history = self.defense.monitor.history
            if history and history[-1] is not self._logged:
                scalars = record_scalars(history[-1], self.defense.monitor.tag)
                pl_module.log_dict(scalars, on_step=True, on_epoch=False, logger=trainer.logger is not None,
                                   prog_bar=False,
                                   batch_size=self.last_batch_size)
                self._logged = history[-1]

        # -- checkpoints ----------------------------------------------------------------------------------
        def state_dict(self) -> dict[str, Any]:
            """The defense's state (step, spectrum, generators), saved into Lightning checkpoints."""
            return {} if self.defense is None else {"defense": self.defense.state_dict()}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Restore :meth:`state_dict` (applied at ``setup`` when the defense does not exist yet)."""
            state = state_dict.get("defense")
            if state is None:
                return
            if self.defense is None:
                self._pending_state = state
            else:
                self.defense.load_state_dict(state)

    GradientDefenseCallback.__module__ = __name__
    return GradientDefenseCallback


def __getattr__(name: str) -> Any:
    if name == "GradientDefenseCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
