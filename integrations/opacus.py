"""Compose :class:`~invdefend.GradientDefense` with Opacus's DP-SGD (``PrivacyEngine.make_private``).

After ``make_private`` three added lines::

    model, optimizer, loader = privacy_engine.make_private(module=model, optimizer=optimizer, ...)
    dp = OpacusDefense(privacy_engine, model, optimizer, criterion, delta=1e-5, budget=0.05)
    # the training loop is unchanged; use dp.criterion in place of criterion if it is a plain function

How it composes (Opacus 1.6, ``opacus/optimizers/optimizer.py``): ``DPOptimizer.pre_step`` clips the
per-sample gradients into ``p.summed_grad``, writes ``p.grad = summed_grad + N(0, σ²C²)``, divides by the
expected batch size, then calls ``step_hook`` — the accountant's hook that ``PrivacyEngine`` attached —
and finally the wrapped optimizer steps. :class:`OpacusDefense` **chains** onto ``step_hook``: its hook
calls the original one first (so accounting advances exactly as before), then adds the defense's noise to
``p.grad``. The update therefore carries both noises: ``p.grad = clip_mean + DP noise + δ``.

* The defense's energy budget is measured against the clipped mean gradient (``summed_grad`` over the same
  divisor Opacus uses), not against the DP-noised one, so a large ``noise_multiplier`` does not inflate it.
* Skipped steps (``signal_skip_step``, ``BatchMemoryManager``) do not call ``step_hook``: nothing is
  released then, and the inputs of every physical batch that contributes to the next real step are kept.
  An empty Poisson batch releases only DP noise; the defense then adds nothing and counts it in
  :attr:`OpacusDefense.empty_steps`.
* The Jacobian is taken on the module inside the ``GradSampleModule``. Opacus's hooks are removed while the
  defense runs (its full backward hooks cannot run under ``torch.func`` transforms, even when disabled)
  and added back with the same settings, so the estimator neither stores activations nor adds per-sample
  gradients.
* ε from the accountant (``privacy_engine.get_epsilon(delta)``) is written beside the risk: into every
  :class:`~invdefend.ReleaseRecord`'s ``extra`` (``epsilon``, ``delta``, ``noise_multiplier``,
  ``max_grad_norm``, ``dp_noise_relative_energy``, ``dp_predicted_psnr``) and, with a writer, as
  ``invdefend/gradient/privacy/{epsilon,dp_noise_relative_energy,dp_predicted_psnr_max}``.

Two risks are reported at each spectrum refresh, both on the unclipped per-sample gradient's Jacobian:
the defense's own ``predicted_psnr`` (its noise only) and ``extra["dp_predicted_psnr"]`` (Opacus's noise
only, per-sample variance ``(σC)²``). Clipping and the other mechanism's noise only lower what an attacker
can recover, so the smaller of the two is an upper bound on the risk of the composed release (in the
linear-Gaussian model of THEORY §3).

Opacus is imported when an :class:`OpacusDefense` is built, never by ``import invdefend``. Tested with the
default ``grad_sample_mode="hooks"``; distributed DP optimizers are refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from invdefend import DefenseError
from invdefend.defense.gradient import GradientDefense
from invdefend.monitor import ReleaseRecord
from invdefend.risk import invloss_from_values, predicted_psnr

__all__ = ["OpacusDefense"]


def _require_opacus() -> Any:
    try:
        import opacus
    except ImportError as exc:  # pragma: no cover - opacus is a core requirement
        raise ImportError("invdefend.integrations.opacus needs opacus >= 1.5: pip install opacus") from exc
    return opacus


@contextlib.contextmanager
def _without_grad_sample_hooks(gsm: Any | None) -> Iterator[None]:
    """Remove a ``GradSampleModule``'s hooks for the duration (its backward hooks cannot run under vmap/jvp,
    even disabled), then add them back with the same settings."""
    if gsm is None or not hasattr(gsm, "autograd_grad_sample_hooks"):
        yield
        return
    enabled = gsm.hooks_enabled
    gsm.remove_hooks()
    try:
        yield
    finally:
        gsm.add_hooks(loss_reduction=gsm.loss_reduction, batch_first=gsm.batch_first,
                      force_functorch=gsm.force_functorch)
        if not enabled:
            gsm.disable_hooks()


class OpacusDefense:
    """Adds :class:`~invdefend.GradientDefense` noise after Opacus's DP noise, keeping its accounting.

    Args:
        privacy_engine: the ``PrivacyEngine`` (or any object with ``get_epsilon(delta)``) whose ε is logged;
            None to log no ε.
        module: the model ``make_private`` returned (a ``GradSampleModule``) or the plain module.
        optimizer: the ``DPOptimizer`` ``make_private`` returned.
        criterion: the training loss ``criterion(outputs, targets) -> scalar`` (mean). An ``nn.Module`` has
            its targets captured by a hook; for a plain function call :attr:`criterion` of this object.
        delta: δ of the reported (ε, δ).
        epsilon_every: compute ε every this many released steps (ε of the others is the last computed).
        defense: a prebuilt :class:`~invdefend.GradientDefense` on the unwrapped module, built with
            ``capture=False``; otherwise one is built from ``defense_kwargs``.
        **defense_kwargs: passed to :class:`~invdefend.GradientDefense` (``budget``, ``mechanism``, ``k``,
            ``probes``, ``refresh_every``, ``seed``, ``writer``, ...).

    Attributes:
        defense: the defense; ``defense.monitor.history`` holds the records.
        original_hook: the ``step_hook`` found on the optimizer (the accountant's), called first.
        epsilon: ε after the last released step (None before, or without a privacy engine).
        empty_steps: released steps whose batch was empty (no defense noise needed).
        last_batch_size: samples behind the last protected step.
    """

    def __init__(
        self,
        privacy_engine: Any | None,
        module: nn.Module,
        optimizer: Any,
        criterion: Callable[[Tensor, Tensor], Tensor],
        *,
        delta: float = 1e-5,
        epsilon_every: int = 1,
        defense: GradientDefense | None = None,
        **defense_kwargs: Any,
    ) -> None:
        opacus = _require_opacus()
        from opacus.optimizers import DPOptimizer

        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                f"invdefend.integrations.opacus: optimizer is a {type(optimizer).__name__}, not an Opacus "
                "DPOptimizer; pass the optimizer returned by PrivacyEngine.make_private (for plain training "
                "use GradientDefense.wrap)"
            )
        distributed = tuple(getattr(opacus.optimizers, n) for n in
                            ("DistributedDPOptimizer", "DistributedPerLayerOptimizer") if hasattr(opacus.optimizers, n))
        if distributed and isinstance(optimizer, distributed):
            raise NotImplementedError(
                "invdefend.integrations.opacus: distributed DP optimizers add noise on rank 0 and all-reduce "
                "after the step hook; composing with them is not supported. Use one process, or protect each "
                "worker's gradient with invdefend.integrations.ddp"
            )
        if not (0.0 < delta < 1.0):
            raise ValueError(f"invdefend.integrations.opacus: delta={delta} must be in (0, 1), e.g. 1e-5")
        if int(epsilon_every) != epsilon_every or epsilon_every < 1:
            raise ValueError(f"invdefend.integrations.opacus: epsilon_every={epsilon_every} must be an integer >= 1")
        from opacus.grad_sample import AbstractGradSampleModule, GradSampleModule

        if isinstance(module, AbstractGradSampleModule) and "FastGradientClipping" in type(module).__name__:
            raise NotImplementedError(
                "invdefend.integrations.opacus: ghost clipping (grad_sample_mode='ghost') is not supported; "
                "use grad_sample_mode='hooks' (the default) or 'functorch'"
            )
        self.grad_sample_module = module if type(module) is GradSampleModule else None
        inner = module._module if isinstance(module, AbstractGradSampleModule) else module
        if defense is not None and defense_kwargs:
            raise TypeError("invdefend.integrations.opacus: pass either defense= or defense keyword arguments, not both")
        if defense is not None and defense.model is not inner:
            raise ValueError(
                "invdefend.integrations.opacus: the given defense is built on a different module; build it on "
                "the module inside the GradSampleModule (module._module) with capture=False"
            )
        self.privacy_engine = privacy_engine
        self.optimizer = optimizer
        self.module = inner
        self.loss = criterion
        self.delta = float(delta)
        self.epsilon_every = int(epsilon_every)
        self.defense = defense or GradientDefense(inner, criterion, capture=False, **defense_kwargs)
        self.epsilon: float | None = None
        self.empty_steps = 0
        self.last_batch_size = 0
        self._released = 0
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._busy = False
        self._pending_extra: dict[str, Any] = {}
        self._handles = [inner.register_forward_pre_hook(self._capture_inputs)]
        if isinstance(criterion, nn.Module):
            self._handles.append(criterion.register_forward_pre_hook(self._capture_targets))
        self.defense.monitor.subscribe(self._annotate, first=True)  # annotates the record before others see it
        self.original_hook = optimizer.step_hook
        optimizer.attach_step_hook(self._step_hook)

    # -- capture --------------------------------------------------------------------------------------------
    def _accumulating(self) -> bool:
        """Whether per-sample gradients of earlier batches still count toward the next step."""
        return any(getattr(p, "grad_sample", None) is not None or getattr(p, "summed_grad", None) is not None
                   for p in self.optimizer.params)

    def _capture_inputs(self, module: nn.Module, args: tuple) -> None:
        if self._busy or not module.training or not torch.is_grad_enabled():
            return
        if not self._accumulating():
            self._xs, self._ys = [], []
        if args and isinstance(args[0], Tensor):
            self._xs.append(args[0].detach())

    def _capture_targets(self, module: nn.Module, args: tuple) -> None:
        if len(args) >= 2 and isinstance(args[1], Tensor):
            self._append_target(args[1])

    def _append_target(self, targets: Tensor) -> None:
        if not self._busy and self.module.training and torch.is_grad_enabled():
            self._ys.append(targets.detach())  # the same filter as the inputs: evaluation passes are skipped

    @property
    def criterion(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The loss, capturing its targets when it is a plain function (a module is hooked already)."""

        def wrapped(outputs: Tensor, targets: Tensor) -> Tensor:
            if not isinstance(self.loss, nn.Module):
                self._append_target(targets)
            return self.loss(outputs, targets)

        return wrapped

    # -- the chained step hook -----------------------------------------------------------------------------
    def _step_hook(self, optimizer: Any) -> None:
        if self.original_hook is not None:
            self.original_hook(optimizer)  # privacy accounting first, exactly as Opacus does it
        self._release(optimizer)

    def _current_epsilon(self) -> float | None:
        if self.privacy_engine is None:
            return None
        if self.epsilon is None or self._released % self.epsilon_every == 0:
            self.epsilon = float(self.privacy_engine.get_epsilon(self.delta))
        return self.epsilon

    def _release(self, optimizer: Any) -> None:
        xs, ys = self._xs, self._ys
        self._xs, self._ys = [], []
        n = sum(int(x.shape[0]) for x in xs)
        epsilon = self._current_epsilon()
        self._released += 1
        if n == 0:
            self.empty_steps += 1  # an empty Poisson batch: the update is DP noise only, no data to protect
            return
        if len(ys) == 0:
            raise DefenseError(
                "invdefend.integrations.opacus: no targets captured for this step; call the criterion given "
                "to OpacusDefense (or OpacusDefense.criterion for a plain function) in the training loop"
            )
        inputs, targets = torch.cat(xs), torch.cat(ys)
        params = [p for p in self.module.parameters() if p.requires_grad]
        divisor = 1.0
        if getattr(optimizer, "loss_reduction", "mean") == "mean":
            divisor = float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
        released, clean = [], []
        for p in params:
            if p.grad is None:
                released.append(None)
                clean.append(None)
                continue
            summed = getattr(p, "summed_grad", None)
            released.append(p.grad.detach().clone())
            clean.append(p.grad.detach().clone() if summed is None else (summed.detach() / divisor).view_as(p).to(p.grad))
        signal = sum(float(c.double().pow(2).sum()) for c in clean if c is not None)
        dp_energy = sum(float((r - c).double().pow(2).sum()) for r, c in zip(released, clean) if r is not None)
        self._pending_extra = {
            "epsilon": epsilon,
            "delta": self.delta,
            "noise_multiplier": float(optimizer.noise_multiplier),
            "max_grad_norm": float(optimizer.max_grad_norm),
            "dp_noise_relative_energy": dp_energy / signal if signal > 0 else math.inf,
            "_dims": (int(inputs[0].numel()), sum(p.numel() for p in params)),
        }
        with torch.no_grad():
            for p, c in zip(params, clean):
                if c is not None:
                    p.grad.copy_(c)  # the defense measures its budget against the clipped mean gradient
        self.last_batch_size = int(inputs.shape[0])
        self.defense.capture(inputs, targets)
        self._busy = True
        try:
            with _without_grad_sample_hooks(self.grad_sample_module):
                self.defense.protect()
        finally:
            self._busy = False
            with torch.no_grad():
                for p, r, c in zip(params, released, clean):
                    if r is not None:
                        p.grad.copy_(r + (p.grad - c))  # Opacus's release plus the defense's noise
            self._pending_extra = {}

    def _annotate(self, record: ReleaseRecord) -> None:
        """First monitor callback: put ε and the DP figures into the record, and beside the risk in TensorBoard."""
        if not self._pending_extra:
            return
        extra = dict(self._pending_extra)
        in_dim, out_dim = extra.pop("_dims")
        extra["dp_predicted_psnr"] = self._dp_predicted_psnr(record, extra["noise_multiplier"] * extra["max_grad_norm"],
                                                             in_dim, out_dim)
        record.extra.update(extra)
        writer = self.defense.monitor.writer
        if writer is not None:
            tag = self.defense.monitor.tag
            if extra["epsilon"] is not None:
                writer.add_scalar(tag(record.kind, "privacy/epsilon"), extra["epsilon"], record.step)
            writer.add_scalar(tag(record.kind, "privacy/dp_noise_relative_energy"),
                              extra["dp_noise_relative_energy"], record.step)
            if extra["dp_predicted_psnr"]:
                writer.add_scalar(tag(record.kind, "privacy/dp_predicted_psnr_max"),
                                  max(extra["dp_predicted_psnr"]), record.step)

    def _dp_predicted_psnr(self, record: ReleaseRecord, noise_std: float, in_dim: int, out_dim: int) -> list[float]:
        """Predicted PSNR of the probes under Opacus's noise alone, on the spectrum of this refresh.

        Knowing the rest of the batch, an attacker isolates ``clip(g_i) + N(0, σ²C²·I)``: per-sample
        isotropic noise of variance ``(σC)²``. The top-k tail treatment of the defense's own records is used;
        the attacker-precision reference is left out (negligible beside DP noise). Empty when the step did
        not refresh the spectrum or Opacus adds no noise.
        """
        probes = len(record.predicted_psnr)
        if probes == 0 or not record.singular_values or noise_std <= 0:
            return []
        s = torch.tensor(record.singular_values, dtype=torch.float64).reshape(probes, -1)
        var = torch.full((probes,), float(noise_std) ** 2, dtype=torch.float64)
        il = invloss_from_values(s, var.unsqueeze(-1).expand_as(s), in_dim=in_dim, v0=self.defense.v0,
                                 tail_tau=var, rank_bound=min(in_dim, out_dim))
        return predicted_psnr(il, self.defense.dynamic_range).tolist()

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def records(self) -> list[ReleaseRecord]:
        """The release records so far (the defense monitor's history: its latest ``max_history``)."""
        return self.defense.monitor.history

    def detach(self) -> None:
        """Give the optimizer its original step hook back and remove the capture hooks."""
        if self.optimizer.step_hook != self._step_hook:
            raise RuntimeError(
                "invdefend.integrations.opacus: the optimizer's step_hook is no longer this defense's (something "
                "chained after it); detach that first so the accountant's hook is not lost"
            )
        self.optimizer.step_hook = self.original_hook
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._annotate in self.defense.monitor.callbacks:
            self.defense.monitor.unsubscribe(self._annotate)
