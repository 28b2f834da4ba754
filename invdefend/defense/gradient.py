"""Noise on shared gradients (horizontal FL, data-parallel training) — THEORY §4.

:class:`GradientDefense` goes into an existing loop as two added lines::

    defense = GradientDefense(model, criterion, budget=0.05)   # hooks capture inputs and labels
    optimizer = defense.wrap(optimizer)                         # step() = protect gradients, then step

At the defaults half of ``budget`` is an isotropic floor and half is water-filled on the top-k of the
Jacobian whitened by the data prior the defense fits online on the batches it already released
(``prior="online"``, ``floor=None``; ``docs/frontier.md`` measures it against isotropic noise).

Every step is one short pipeline, **capture → estimate → plan → draw → record**:

1. **Capture.** A forward pre-hook on the model keeps the last batch's inputs; when the criterion is an
   ``nn.Module`` a pre-hook on it keeps the targets (otherwise call :meth:`~GradientDefense.capture`, or
   use :meth:`~GradientDefense.criterion`).
2. **Estimate** (on refresh steps, every ``refresh_every``): the spectrum of the per-sample gradient
   Jacobian of ``probes`` samples of the batch, by the defense's :class:`~invdefend.spectral.SpectrumTracker`
   (exact when ``k >= min(d, m)``, else top-k warm-started from the last estimate's parameter-space
   subspace), checked by :func:`~invdefend.spectral.check_estimate`.
3. **Plan** (on refresh steps): the placement (:mod:`invdefend.placements`, chosen by ``mechanism``) plans
   each probe's noise in per-sample units — with the attacker knowing the rest of a batch of ``B``, noise on
   the mean gradient counts ``B²`` times for one sample — and the plan is kept per unit of ``‖ḡ‖²``
   (:class:`GradientPlan`), so the steps in between only rescale it.
4. **Draw** (every step). ``δ = Σ_j U_j (√(τ_j·‖ḡ‖²) ⊙ z_j)`` over the probes (each in its own top-k left
   singular subspace) plus the isotropic part ``√(iso·‖ḡ‖²)·z``; a placement that draws from the Jacobian
   operator (band-pass) adds its draw, rescaled to energy exactly ``budget·‖ḡ‖²``. Between refreshes a
   Gaussian plan costs one ``(m × probes·k)`` product and a few norms.
5. **Record** risk, energy and estimator health to a :class:`~invdefend.monitor.RiskMonitor`.

The plan in force and its public noise law (:meth:`~GradientDefense.noise_law`) are what attackers and
InvRE read.

**Band-pass** (``mechanism="band_pass"``, ``docs/frontier_uniform_init.md``): at *every* step, ``probes`` samples of the
current batch get ``J·(JᵀJ + μ)⁻¹·w`` noise, rescaled to energy exactly ``budget·‖ḡ‖²``, plus the isotropic
``floor``. Recommended: ``GradientDefense(model, loss, mechanism="band_pass", budget=0.75·E, floor=0.25·E)``.
It costs ``probes × band_pass_steps`` Jacobian-vector/vector-Jacobian product pairs at every step. Its risk
record is conservative (``record.risk_noise_model == "floor_only"``). A band-pass draw that raises, is
NaN/Inf or is zero releases that step under fallback noise; a failed top-k estimate does not change the
band-pass noise (it needs no spectrum): it warns, records ``record.risk_estimate_failed`` and no risk.

**Fail closed.** If estimation raises, returns NaN/Inf, or does not converge (its estimator error — the
largest Ritz residual ``‖JᵀJv − σ²v‖`` relative to ``σ₁²`` — stays above ``max_residual``), no spectrum is
trusted until a later estimate succeeds: every step in between is released with isotropic noise of energy
``fallback_budget·‖ḡ‖²``, warns (``RuntimeWarning``) and is recorded with ``fallback=True``. A failed
estimate is retried after 1, 2, 4, … steps (at most ``refresh_every``). A gradient that is itself NaN/Inf,
or a missing capture, raises :class:`~invdefend.defense.DefenseError`: no update leaves unprotected. In
``mechanism="monitor"`` (no noise by request) a failed estimate is recorded and warned about, and no noise
is added.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cumulative import ReleaseLedger
from ..jacobian import (
    JacobianOperator,
    batch_gradient_jacobian,
    batch_statistics,
    find_module,
    gradient_jacobian,
    trainable_parameters,
    training_batch_norms,
)
from ..monitor import HParam, ReleaseRecord, RiskMonitor, logger
from ..noise import NoiseSource
from ..noise_law import NoiseLaw
from ..placements import NoisePlan, Placement, PlanContext
from ..placements.base import gaussian_law
from ..prior import GaussianPrior
from ..probe_reconstruction import ProbeReconstruction, reconstruct_probe
from ..risk import invloss_by_group, predicted_psnr
from ..spectral import Spectrum, SpectrumTracker, check_estimate, keeps_no_images
from ..whitened import WhitenedOperator
from .checks import DefenseError, check_batch, check_model, risk_fields
from .prior_source import prior_source
from .settings import DefenseSettings, SettingsAccess, pipeline_parts, settings_hparams

__all__ = ["GradientDefense", "DefendedOptimizer", "GradientPlan"]


@dataclass(frozen=True)
class GradientPlan:
    """The noise plan in force, per unit of the released mean gradient's energy ``‖ḡ‖²``.

    Attributes:
        shaped: ``(P, k)`` float64 variances along each probe's left singular vectors, divided by ``‖ḡ‖²``
            (None when no noise is shaped).
        isotropic: variance per coordinate, divided by ``‖ḡ‖²``.
        relative_budget: ``E‖δ‖² / ‖ḡ‖²`` of a release under this plan.
        target_reached: target mode: whether every probe reached the target.
        operator_budget: relative energy drawn from the Jacobian operator at every step (band-pass), 0 else.
        risk_noise_model: ``"full"``, or ``"floor_only"`` when the recorded risk leaves operator noise out.
    """

    shaped: Tensor | None
    isotropic: float
    relative_budget: float
    target_reached: bool | None = None
    operator_budget: float = 0.0
    risk_noise_model: str = "full"

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict."""
        return {"shaped": self.shaped, "isotropic": self.isotropic, "relative_budget": self.relative_budget,
                "target_reached": self.target_reached, "operator_budget": self.operator_budget,
                "risk_noise_model": self.risk_noise_model}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "GradientPlan":
        """Inverse of :meth:`state_dict`."""
        return cls(shaped=state["shaped"], isotropic=float(state["isotropic"]),
                   relative_budget=float(state["relative_budget"]), target_reached=state["target_reached"],
                   operator_budget=float(state.get("operator_budget", 0.0)),
                   risk_noise_model=str(state.get("risk_noise_model", "full")))


class GradientDefense(SettingsAccess):
    """Adaptive noise on the gradients a model shares.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean reduction). If it is an ``nn.Module`` its
            targets are captured by a hook; otherwise call :meth:`capture` (or use :meth:`criterion`).
        settings: a :class:`~invdefend.defense.DefenseSettings` (default: the gradient defaults); any of its
            fields may also be passed as keywords (``budget=0.05, mechanism="isotropic", k=8, ...``), which
            override it. The settings are readable as attributes (``defense.budget``).
        placement: a :class:`~invdefend.placements.Placement` to run instead of the one the settings name.
        generator: an explicit ``torch.Generator`` for the noise (instead of ``seed``).
        monitor: a :class:`RiskMonitor`; or pass ``writer``/``callbacks`` to build one.
        capture: install the capture hooks now (else call :meth:`attach` or :meth:`capture`).
        embedding_module: for models that take token ids: the submodule (or its qualified name) whose output
            is the embedded sequence. The Jacobian is then taken with respect to that output, the risk is per
            sequence (and :attr:`~invdefend.monitor.ReleaseRecord.per_token_leakage` per token), and the
            embedding table is covered like every other parameter. Its gradient is non-zero exactly on the
            rows of the batch's tokens, and shaped noise lands only on those rows, so this path needs an
            isotropic floor (``floor > 0``; the default keeps half of ``budget``) to hide which rows they are.

    Key settings: ``budget`` (noise energy relative to ``‖ḡ‖²``), ``floor`` (isotropic energy added
    everywhere), ``mechanism`` (``"spectral"``, ``"band_pass"``, ``"isotropic"``, ``"monitor"``, or a
    registered placement), ``target_psnr``/``max_budget`` (target mode), ``k`` and ``probes`` (the estimate),
    ``refresh_every`` (steps between estimates; a refresh costs about 20 plain batch-32 LeNet steps, so the
    default 100 keeps the amortised cost near 1.3x a plain step), ``fallback_budget`` (default
    ``max(10·budget, 0.1)``), ``seed``/``secure_rng`` (the noise source; ``seed`` also seeds the probe choice),
    ``reconstruct_probe`` (off by default: attack iterations of a diagnostic reconstruction of one probe at every
    refresh, written to the monitor as an image; about 0.1-1 s per refresh on small models).
    See :class:`~invdefend.defense.DefenseSettings` for all of them.
    """

    kind = "gradient"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        settings: DefenseSettings | None = None,
        *,
        placement: Placement | None = None,
        generator: torch.Generator | None = None,
        monitor: RiskMonitor | None = None,
        writer: Any | None = None,
        callbacks: Iterable[Callable[[ReleaseRecord], None]] = (),
        capture: bool = True,
        embedding_module: str | nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        parts = pipeline_parts("GradientDefense", self.kind, settings, overrides, placement, generator)
        if parts.settings.reconstruct_probe and embedding_module is not None:
            raise ValueError(
                "invdefend.GradientDefense: reconstruct_probe needs floating-point inputs to reconstruct; token ids "
                "(embedding_module) cannot be attacked by gradient matching, leave reconstruct_probe=0"
            )
        trainable_parameters(model)  # all frozen: nothing is shared, refuse now
        check_model("GradientDefense", model)  # half precision: refuse now, not at every step
        self.settings = s = parts.settings
        self.model = model
        self.embedding_module: nn.Module | None = (
            None if embedding_module is None else find_module("GradientDefense", model, embedding_module))
        self.loss_fn = loss_fn
        self.placement: Placement = parts.placement
        self.noise: NoiseSource = parts.noise
        self.probe_generator = parts.generator
        self.prior_source = prior_source("GradientDefense", s.prior)
        self.ledger = ReleaseLedger(s.releases_per_sample)  # releases per sample, for the cumulative risk
        self._ids: Tensor | None = None
        self._prior_label = self.prior_source.label
        self.estimator = SpectrumTracker(
            s.k, oversample=s.oversample, sweeps=s.sweeps, cold_sweeps=s.cold_sweeps, max_residual=s.max_residual,
            warm_start=True, generator=self.probe_generator,
        )
        self.monitor = monitor or RiskMonitor(writer, callbacks=callbacks)
        self.step = 0
        self.last_record: ReleaseRecord | None = None
        self._spectrum: Spectrum | None = None  # the probes' spectrum in force (None: no trusted estimate)
        self._plan: GradientPlan | None = None
        self._energy_last = 0.0  # ‖ḡ‖² of the last release (scales the noise law)
        self._operator_params: dict[str, list[float]] = {}
        self._basis_t: tuple[Tensor, Tensor] | None = None  # (noised left vectors as rows, their unit std devs)
        self._buf: tuple[tuple, Tensor, list[Tensor]] | None = None  # flat noise buffer and per-parameter views
        self._next_refresh = 0
        self._failures = 0  # consecutive failed estimates
        self._last_failure = ""
        self._inputs: Tensor | None = None
        self._embedded: Tensor | None = None  # the embedding module's output for the captured batch
        self._targets: Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._busy = False
        self._warned_bn = False
        self._estimate_prior: Any = None  # the prior the spectrum in force was whitened with
        self._probe_index: int | None = None  # the first probe of the last probe operator (reconstruct_probe)
        self._hparams_written = False
        if capture:
            self.attach()

    @property
    def mechanism(self) -> str:
        """The placement's registered name."""
        return self.placement.name

    @property
    def spectrum(self) -> Spectrum | None:
        """The probes' spectrum the noise is currently shaped on (None before the first estimate or after a
        failed one, while steps are released with fallback noise)."""
        return self._spectrum

    @property
    def plan(self) -> GradientPlan | None:
        """The noise plan in force (None before the first trusted estimate, or while in fallback)."""
        return self._plan

    def noise_law(self) -> NoiseLaw | None:
        """The law of the noise the last release carried, for attackers and InvRE (None before any release
        or when no noise was added): a :class:`~invdefend.noise_law.NoiseCovariance` for a Gaussian plan
        (in absolute units of the last release's ``‖ḡ‖²``; the probes' bases side by side), or the operator
        placement's law (:class:`~invdefend.noise_law.BandPassLaw`) with the floor."""
        record, G = self.last_record, self._energy_last
        if record is None or record.relative_energy == 0.0:
            return None
        m = sum(p.numel() for p in self._params())
        if record.fallback or self._plan is None:
            return gaussian_law(None, None, self.fallback_budget * G / m)
        plan = self._plan
        if plan.operator_budget > 0:
            return self.placement.operator_law(self._operator_params, budget=plan.operator_budget,
                                               floor=plan.isotropic * m, signal_energy=G, out_dim=m)
        spec = self._spectrum
        basis = None if spec is None else spec.left_vectors
        shaped = None if plan.shaped is None else plan.shaped * G
        return gaussian_law(basis, shaped, plan.isotropic * G)

    # -- capture ------------------------------------------------------------------------------------------
    def attach(self) -> "GradientDefense":
        """Install the capture hooks (done by the constructor unless ``capture=False``); returns self."""
        if self._hooks:
            return self
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_inputs))
        if self.embedding_module is not None:
            self._hooks.append(self.embedding_module.register_forward_hook(self._capture_embedded))
        if isinstance(self.loss_fn, nn.Module):
            self._hooks.append(self.loss_fn.register_forward_pre_hook(self._capture_targets))
        return self

    def detach(self) -> None:
        """Remove every hook this defense installed; the model then behaves exactly as before."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _capture_inputs(self, module: nn.Module, args: tuple) -> None:
        if self._busy:
            return  # the estimator's own per-sample evaluations are not the user's batch
        if args and isinstance(args[0], Tensor):
            self._inputs = args[0].detach()

    def _capture_embedded(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not self._busy and isinstance(out, Tensor):
            self._embedded = out.detach()

    def _capture_targets(self, module: nn.Module, args: tuple) -> None:
        if self._busy:
            return
        if len(args) >= 2 and isinstance(args[1], Tensor):
            self._targets = args[1].detach()

    def capture(self, inputs: Tensor, targets: Tensor, ids: Tensor | None = None) -> None:
        """Tell the defense which batch produced the current gradients (for function losses); ``ids``
        (integer sample identities, e.g. dataset indices) feed the cumulative risk's release counts."""
        self._inputs, self._targets = inputs.detach(), targets.detach()
        if ids is not None:
            self.capture_ids(ids)

    def capture_ids(self, ids: Tensor) -> None:
        """The sample identities of the next released batch (one integer per sample), for the cumulative
        risk; used by the next :meth:`protect` only."""
        self._ids = ids

    def criterion(self) -> Callable[[Tensor, Tensor], Tensor]:
        """``loss_fn`` wrapped so that calling it also captures the targets."""

        def wrapped(outputs: Tensor, targets: Tensor) -> Tensor:
            if not self._busy:
                self._targets = targets.detach()
            return self.loss_fn(outputs, targets)

        return wrapped

    def wrap(self, optimizer: torch.optim.Optimizer) -> "DefendedOptimizer":
        """An optimizer whose ``step()`` protects the gradients first."""
        return DefendedOptimizer(optimizer, self)

    # -- estimate and plan --------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return list(trainable_parameters(self.model).values())

    def _energy(self, params: list[Tensor]) -> float:
        """``‖ḡ‖²`` over the trainable parameters' gradients (None counts as zero) in float64; raises
        :class:`DefenseError` if a gradient holds NaN/Inf (the norms then do)."""
        grads = [p.grad.detach() for p in params if p.grad is not None]
        energy = 0.0
        if grads:
            norms = torch._foreach_norm(grads)
            if len({n.dtype for n in norms}) == 1 and len({n.device for n in norms}) == 1:
                energy = float(torch.stack(norms).double().pow(2).sum())
            else:
                energy = sum(float(n.double()) ** 2 for n in norms)
        if not math.isfinite(energy):
            raise DefenseError(
                "invdefend.GradientDefense: the gradient contains NaN/Inf, nothing was released; "
                "lower the learning rate or clip gradients before the step"
            )
        return energy

    def _buffer(self, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """A flat noise buffer ``(m,)`` and its per-parameter views, reused while the parameters stay the same."""
        key = tuple((id(p), p.shape, p.dtype, p.device) for p in params)
        if self._buf is None or self._buf[0] != key:
            dtype = params[0].dtype if len({p.dtype for p in params}) == 1 else torch.float64
            buf = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            views, offset = [], 0
            for p in params:
                views.append(buf[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            self._buf = (key, buf, views)
        return self._buf[1], self._buf[2]

    def _points(self, inputs: Tensor) -> Tensor:
        """Where the Jacobian is taken: the inputs, or with an embedding module the embedded batch captured
        by its hook (raises :class:`DefenseError` when it does not belong to the captured inputs)."""
        if self.embedding_module is None:
            return inputs
        emb = self._embedded
        if emb is None or emb.shape[0] != inputs.shape[0]:
            raise DefenseError(
                "invdefend.GradientDefense: no embedded batch was captured for the captured inputs "
                f"({'none' if emb is None else f'{emb.shape[0]} embedded sequences for {inputs.shape[0]} inputs'}); "
                "run the model's forward on the batch (the embedding module's hook records its output); nothing "
                "was released"
            )
        return emb

    def covers(self, parameters: Iterable[Tensor]) -> list[Tensor]:
        """The tensors in ``parameters`` that carry a gradient but receive no noise from this defense (they
        are not trainable parameters of :attr:`model`); empty when every one is covered."""
        covered = {id(p) for p in self._params()}
        return [p for p in parameters if isinstance(p, Tensor) and p.grad is not None and id(p) not in covered]

    def check_coverage(self, parameters: Iterable[Tensor], where: str = "GradientDefense") -> None:
        """Refuse (:class:`DefenseError`, nothing released) when a parameter about to be stepped carries a
        gradient this defense would not noise: its raw gradient would leave unprotected. A placement that adds
        no noise by request (``mechanism="monitor"``) is not checked."""
        if not self.placement.adds_noise:
            return
        missing = self.covers(parameters)
        if missing:
            shapes = ", ".join(str(tuple(p.shape)) for p in missing[:6]) + (", ..." if len(missing) > 6 else "")
            raise DefenseError(
                f"invdefend.{where}: {len(missing)} parameter(s) the optimizer steps carry a gradient the defense "
                f"does not noise (shapes {shapes}; {sum(p.numel() for p in missing)} entries), so it would leave "
                f"unprotected; nothing was released. Defend the model that owns every stepped parameter "
                f"(for token ids: GradientDefense(whole_model, loss, embedding_module='<embedding name>')), "
                f"freeze the others (requires_grad=False), or leave them out of the optimizer"
            )

    def _batch(self) -> tuple[Tensor, Tensor]:
        if self._inputs is None or self._targets is None:
            raise DefenseError(
                "invdefend.GradientDefense: no (inputs, targets) captured before step(); run the forward "
                "pass of the wrapped model and loss module, or call defense.capture(inputs, targets)"
            )
        if self._inputs.shape[0] != self._targets.shape[0]:
            raise DefenseError(
                f"invdefend.GradientDefense: captured {self._inputs.shape[0]} inputs but "
                f"{self._targets.shape[0]} targets; the loss must see the same batch as the model"
            )
        return self._inputs, self._targets

    def draw_probes(self, batch_size: int) -> Tensor:
        """``probes`` sample indices of a batch, drawn by :attr:`probe_generator`."""
        return torch.randperm(batch_size, generator=self.probe_generator)[: min(self.probes, batch_size)]

    @contextlib.contextmanager
    def probe_operator(self, inputs: Tensor, targets: Tensor, *, index: Tensor | None = None,
                       dtype: torch.dtype | None = None) -> Iterator[JacobianOperator]:
        """The per-sample gradient Jacobian of ``probes`` samples of the batch (``index``, or drawn by
        :meth:`draw_probes`), evaluated in ``dtype`` when given (cast copies of the parameters and inputs).
        Inside the block gradients are enabled and the capture hooks ignore the forwards the operator's
        products run (they are not the user's batch)."""
        idx = index if index is not None else self.draw_probes(int(inputs.shape[0]))
        self._probe_index = int(idx[0]) if idx.numel() else None
        coupled = self.mode == "eval" and bool(training_batch_norms(self.model))
        exact = coupled and self.batch_norm == "batch" and self.embedding_module is None
        if coupled and not exact and self.batch_norm != "frozen" and not self._warned_bn:
            self._warned_bn = True
            warnings.warn(
                "invdefend.GradientDefense: the model trains BatchNorm on batch statistics but the Jacobian is "
                + ("taken on its running statistics (batch_norm='running')" if self.batch_norm == "running" else
                   "taken with the batch's statistics held fixed (batch_norm='batch' is not available with "
                   "embedding_module)")
                + "; the predicted risk is that of another function than the one trained "
                "(docs/theory.md, 'BatchNorm as trained')",
                RuntimeWarning,
                stacklevel=4,
            )
        self._busy = True
        try:
            with torch.enable_grad():
                if exact:
                    yield batch_gradient_jacobian(self.model, self.loss_fn, inputs, targets, idx, dtype=dtype)
                else:
                    stats = (batch_statistics(self.model, inputs) if coupled and self.batch_norm != "running"
                             else None)
                    yield gradient_jacobian(self.model, self.loss_fn, inputs[idx], targets[idx], mode=self.mode,
                                            embedding_module=self.embedding_module, buffers=stats, dtype=dtype)
        finally:
            self._busy = False

    def estimate(self, inputs: Tensor, targets: Tensor) -> Spectrum:
        """The probes' spectrum by :attr:`estimator`, trusted (:func:`~invdefend.spectral.check_estimate`)
        or raising.

        A float32 estimate that does not converge on a model small enough to keep its sweeps' images
        (:func:`~invdefend.spectral.keeps_no_images` false: its products are cheap) is taken once more in
        float64 on the same probes before the step falls back to isotropic noise: late in training a
        confidently classified sample's gradient is a difference of nearly equal terms, and float32
        round-off then keeps the residuals above the trust threshold (measured on the demo's face CNN: error
        0.64 after 8 float32 sweeps, 2·10⁻⁵ after 2 float64 ones). The result is returned in the model's
        dtype, its ``extra["start"]`` suffixed ``+float64``."""
        prior = self.prior_source.current()
        self._estimate_prior = prior
        idx = self.draw_probes(int(inputs.shape[0]))

        def run(dtype: torch.dtype | None) -> tuple[Spectrum, torch.dtype, bool]:
            with self.probe_operator(inputs, targets, index=idx, dtype=dtype) as op:
                wrapped = op if prior is None else WhitenedOperator(op, prior)
                spec = self.estimator.estimate(wrapped)
                s = self.settings
                lean = keeps_no_images(wrapped, min(s.k + s.oversample, wrapped.in_dim), s.cold_sweeps)
            return spec, op.dtype, lean

        spec, dtype, lean = run(None)
        try:
            return check_estimate(spec, self.max_residual)
        except RuntimeError:  # not converged (NaN/Inf raise FloatingPointError: no retry)
            if dtype != torch.float32 or lean:
                raise
        retry, _, _ = run(torch.float64)
        retry = check_estimate(retry, self.max_residual).to(dtype)
        retry.extra["start"] = f"{retry.extra.get('start', '')}+float64"
        return retry

    def _check_plan_covers(self, plan: GradientPlan, spec: Spectrum) -> None:
        """Raise if a plan without an isotropic part would leave a trainable parameter with no noise at all
        (e.g. an embedding table the Jacobian does not reach, with ``floor=0``): fail closed."""
        if plan.isotropic > 0 or plan.operator_budget > 0 or plan.shaped is None or spec.left_vectors is None:
            return
        U = spec.left_vectors.double()  # (P, m, k)
        per_coordinate = (U.pow(2) * (plan.shaped.to(U) > 0).unsqueeze(1)).sum(dim=(0, 2))
        names = list(trainable_parameters(self.model))
        offset, bare = 0, []
        for name, p in zip(names, self._params()):
            if float(per_coordinate[offset : offset + p.numel()].sum()) <= 1e-12 * p.numel():
                bare.append(name)
            offset += p.numel()
        if bare:
            raise RuntimeError(
                f"the {self.mechanism} plan has no isotropic floor and leaves {', '.join(bare[:5])}"
                f"{', ...' if len(bare) > 5 else ''} without noise (the Jacobian does not reach it); set floor > 0"
            )

    def _per_token_psnr(self, spec: Spectrum, eff: NoisePlan, points: Tensor) -> list[list[float]]:
        """Per probe and token, the predicted PSNR of that token's embedding under the release's noise (empty
        when the embedded sample has no token axis or the spectrum no input-space vectors)."""
        tokens = int(points.shape[1]) if points.dim() >= 3 else 0
        if tokens < 1 or spec.right_vectors is None:
            return []
        per_token = invloss_by_group(spec, eff.noise_model(self.rho), groups=tokens, v0=self.v0,
                                     prior=self._estimate_prior if spec.whitened else None)
        return predicted_psnr(per_token, self.dynamic_range).tolist()

    def plan_for(self, spec: Spectrum, batch: int, grad_energy: float, releases: int = 1
                 ) -> tuple[GradientPlan, NoisePlan]:
        """The plan for ``spec`` per unit of ``‖ḡ‖²``, and the per-sample effective plan the recorded risk
        is evaluated on. ``releases``: how many releases the batch's samples have taken part in, this one
        included (target mode reaches its target on the cumulative risk over them)."""
        m = spec.out_dim
        scale = float(batch) ** 2  # per-sample effective noise = B² × noise on the mean gradient
        # An all-zero gradient has no scale of its own; allocate as if it had its probes' mean energy.
        G = grad_energy if grad_energy > 0 else float(spec.signal_norm.double().pow(2).mean()) / scale
        G = max(G, 1e-300)
        v0 = 1.0 if spec.whitened else self.v0  # whitened coordinates have unit prior variance
        ctx = PlanContext(spec, scale, G, spec.batch_size, v0, self.rho, torch.float64, max(int(releases), 1))
        eff = self.placement.plan(ctx)
        # One isotropic level per release: the largest any probe's plan asks for (all equal unless target
        # mode sized them per probe); the risk is evaluated with what is released.
        iso_level = float(eff.isotropic.max()) if eff.isotropic.numel() else 0.0
        eff = NoisePlan(eff.shaped, torch.full_like(eff.isotropic, iso_level), eff.target_reached,
                        eff.operator_budget, eff.operator_placement)
        shaped = None if eff.shaped is None else eff.shaped / (scale * G)
        iso_unit = iso_level / (scale * G)
        relative = (float(shaped.sum()) if shaped is not None else 0.0) + iso_unit * m + eff.operator_budget
        plan = GradientPlan(shaped, iso_unit, relative, eff.target_reached, eff.operator_budget,
                            eff.risk_noise_model)
        return plan, eff

    def _spectrum_free_plan(self, m: int, d: int) -> GradientPlan:
        """The plan of a placement that needs no spectrum (band-pass), when no estimate is trusted: the
        placement planned on an empty spectrum, per unit of ``‖ḡ‖²``."""
        empty = Spectrum(torch.zeros(1, 0, dtype=torch.float64), None, None, in_dim=d, out_dim=m,
                         signal_norm=torch.zeros(1, dtype=torch.float64), method="none")
        eff = self.placement.plan(PlanContext(empty, 1.0, 1.0, 1, self.v0, self.rho, torch.float64))
        iso_unit = float(eff.isotropic.max())
        return GradientPlan(None, iso_unit, iso_unit * m + eff.operator_budget, None, eff.operator_budget,
                            eff.risk_noise_model)

    # -- the release ----------------------------------------------------------------------------------------
    def protect(self, *, energy: float | None = None, into: Tensor | None = None) -> ReleaseRecord:
        """Add the defense's noise to the model's gradients in place and record the release.

        Args:
            energy: the ``‖ḡ‖²`` the noise is scaled to (default: that of the gradients, which must then be
                finite). Given, the gradients are not read: the noise can be drawn before they exist (the DDP
                hook scales a step's noise by the previous step's energy to overlap communication).
            into: a flat tensor of the trainable parameters' size receiving the noise (in
                ``model.parameters()`` order) instead of the gradients; zeros when nothing is added.
        """
        params = self._params()
        grad_energy = self._energy(params) if energy is None else _checked_energy(energy)
        if into is not None and (into.dim() != 1 or into.numel() != sum(p.numel() for p in params)):
            raise ValueError(
                f"invdefend.GradientDefense.protect: into must be a flat tensor of the trainable parameters' size "
                f"({sum(p.numel() for p in params)}), got shape {tuple(into.shape)}"
            )
        inputs, targets = self._batch()
        batch = int(inputs.shape[0])
        m = sum(p.numel() for p in params)
        # Re-estimate now if the set of trainable parameters changed (a layer was (un)frozen): the tracked
        # subspace lives in the old parameter space.
        stale = self._spectrum is not None and self._spectrum.out_dim != m
        refreshed = self.step >= self._next_refresh or stale
        fields: dict[str, Any] = {"batch_size": batch}
        releases = 0
        if self._ids is not None or self.ledger.releases_per_sample is not None:
            counts = self.ledger.update(self._ids, batch_size=batch)
            releases = int(counts.max()) if counts.numel() else 0
            fields["releases"] = releases
        self._ids = None
        if refreshed:
            # A batch no estimate can use (empty, integer, half precision, NaN/Inf) is an error to fix, not a
            # step to release under fallback noise. Checked where the batch is used: between refreshes the
            # inputs only matter through the gradient, whose NaN/Inf _energy refuses.
            check_batch("GradientDefense", self._points(inputs))
            t0 = time.perf_counter()
            self._prior_label = self.prior_source.label
            try:
                spec = self.estimate(inputs, targets)
                plan, eff = self.plan_for(spec, batch, grad_energy, releases)
                self._check_plan_covers(plan, spec)
            except Exception as exc:  # fail closed, whatever went wrong
                self._failures += 1
                self._last_failure = f"{type(exc).__name__}: {exc}"
                self._spectrum, self._plan = None, None
                self._next_refresh = self.step + min(2 ** (self._failures - 1), self.refresh_every)
            else:
                self._failures, self._last_failure = 0, ""
                self._spectrum, self._plan = spec, plan
                self.estimator.accept(spec)
                self._basis_t = None
                self._next_refresh = self.step + self.refresh_every
                fields.update(risk_fields(spec, eff, rho=self.rho, v0=self.v0, dynamic_range=self.dynamic_range,
                                          releases=releases))
                if self.embedding_module is not None:
                    fields["per_token_predicted_psnr"] = self._per_token_psnr(spec, eff, self._points(inputs))
            fields["estimate_seconds"] = time.perf_counter() - t0
        plan, spec = self._plan, self._spectrum
        reason = self._last_failure
        operator_drawn = False
        if plan is None and not self.placement.needs_spectrum and self.placement.adds_noise:
            # The operator draw needs no spectrum: a failed estimate only loses the risk record (and this
            # says so); the step is still released with the placement's noise.
            plan = self._spectrum_free_plan(m, int(self._points(inputs)[0].numel()))
            fields["risk_estimate_failed"] = self._last_failure
            if refreshed:
                warnings.warn(
                    f"invdefend.GradientDefense step {self.step}: risk estimation failed ({self._last_failure}); "
                    f"no risk is recorded until a later estimate succeeds, the {self.mechanism} noise is unaffected",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if plan is not None and plan.operator_budget > 0:
            fields["risk_noise_model"] = plan.risk_noise_model
            check_batch("GradientDefense", self._points(inputs))  # used at every step: refuse an unusable batch
            buf, views = self._buffer(params)
            t0 = time.perf_counter()
            try:
                self._operator_params = self._draw_operator(buf, inputs, targets, plan.operator_budget * grad_energy)
            except Exception as exc:  # fail closed for this step, whatever went wrong
                reason = f"{self.mechanism.replace('_', '-')} noise draw: {type(exc).__name__}: {exc}"
                plan = None
            else:
                operator_drawn = True
                fields["noise_parameters"] = self._operator_params
            fields["draw_seconds"] = time.perf_counter() - t0
        if self.embedding_module is not None and plan is not None and self.placement.adds_noise \
                and plan.isotropic <= 0:
            raise DefenseError(
                f"invdefend.GradientDefense step {self.step}: the {self.mechanism} plan has no isotropic floor, so "
                "the embedding table's noise would land only on the rows of the batch's tokens and show which "
                "tokens were used; nothing was released. Set floor > 0 (or leave floor=None)"
            )
        fallback = plan is None and self.placement.adds_noise
        rel = 0.0
        if fallback:
            warnings.warn(
                f"invdefend.GradientDefense step {self.step}: estimation failed ({reason}); "
                f"releasing with conservative isotropic noise (relative energy {self.fallback_budget})",
                RuntimeWarning,
                stacklevel=2,
            )
            buf, views = self._buffer(params)
            buf.copy_(self.noise.normal((m,), buf.dtype, buf.device)).mul_(math.sqrt(self.fallback_budget * grad_energy / m))
            rel = self._emit(params, buf, views, grad_energy, into)
            relative_budget, target_reached = self.fallback_budget, None
        elif plan is None:  # monitor mode without a valid estimate: nothing to add, by request
            relative_budget, target_reached = 0.0, None
            if into is not None:
                into.zero_()
        else:
            buf, views = self._buffer(params)
            if self._draw(plan, spec, grad_energy, buf, wrote=operator_drawn):
                rel = self._emit(params, buf, views, grad_energy, into)
            elif into is not None:
                into.zero_()
            relative_budget, target_reached = plan.relative_budget, plan.target_reached
        self._energy_last = grad_energy
        fields["risk_prior"] = self._prior_label
        record = ReleaseRecord(
            kind=self.kind,
            step=self.step,
            mechanism="fallback" if fallback else self.mechanism,
            relative_energy=rel,
            budget=relative_budget,
            refreshed=refreshed,
            fallback=fallback,
            fallback_reason=reason,
            target_reached=target_reached,
            **fields,
        )
        self.last_record = record
        probe = self._reconstruct_probe(inputs, targets) if refreshed and self.reconstruct_probe else None
        if probe is not None:
            record.extra["probe_attack"] = {"psnr": probe.psnr, "ssim": probe.ssim, "seconds": probe.seconds,
                                            "attack": probe.attack}
        self.prior_source.observe(self._points(inputs))  # after pricing: a batch never prices itself
        if not self._hparams_written:
            self._hparams_written = True
            metrics = ["risk/predicted_psnr_max", "risk/undefended_predicted_psnr_max", "noise/relative_energy"]
            self.monitor.write_hparams(self.kind, self.hparams(),
                                       metrics + (["probe/attack_psnr"] if self.reconstruct_probe else []))
        self.monitor.emit(record)
        if probe is not None:
            self.monitor.write_probe_image(self.kind, record.step, probe.original[0], probe.reconstruction[0],
                                           probe.psnr, probe.ssim, probe.seconds)
        self.step += 1
        return record

    def hparams(self) -> dict[str, HParam]:
        """The settings as TensorBoard hparams (``str``/``int``/``float``/``bool`` only), with the placement,
        the resolved ``floor`` and the prior's kind (``"iid"``, ``"data"``, ``"online"``)."""
        return settings_hparams(self.settings, self.kind, self.placement, self.prior_source.label)

    def _reconstruct_probe(self, inputs: Tensor, targets: Tensor) -> ProbeReconstruction | None:
        """The ``reconstruct_probe`` diagnostic at a refresh: a probe of this batch released alone under the law
        in force, attacked. Never raises (a failure logs a warning: the release is not affected)."""
        i = self._probe_index if self._probe_index is not None and self._probe_index < len(inputs) else 0
        prior = self._estimate_prior if isinstance(self._estimate_prior, GaussianPrior) else None
        self._busy = True  # the attack's forwards are not the user's batch: the capture hooks ignore them
        try:
            return reconstruct_probe(
                self.model, self.loss_fn, inputs[i : i + 1], targets[i : i + 1], self.noise_law(),
                iterations=int(self.reconstruct_probe), law_energy=self._energy_last, prior=prior, mode=self.mode,
                data_range=float(self.dynamic_range), seed=(0 if self.seed is None else int(self.seed)) + self.step,
            )
        except Exception as exc:  # noqa: BLE001 -- a diagnostic: never break (or unprotect) the step
            logger.warning("invdefend.GradientDefense step %d: the probe reconstruction failed (%s: %s); no image "
                           "written, the release is unaffected", self.step, type(exc).__name__, exc)
            return None
        finally:
            self._busy = False

    def _draw_operator(self, buf: Tensor, inputs: Tensor, targets: Tensor, energy: float) -> dict[str, list[float]]:
        """Write the placement's operator noise, of energy exactly ``energy``, into ``buf``; returns its
        per-probe parameters. Raises (``buf`` then holds nothing to release) if the draw fails, is NaN/Inf,
        or is zero."""
        with self.probe_operator(inputs, targets) as op:
            if op.out_dim != buf.numel():
                raise RuntimeError(
                    f"the Jacobian has {op.out_dim} rows but the trainable gradients {buf.numel()} entries"
                )
            delta, params = self.placement.draw_operator(op, self.noise)
        total = delta.detach().double().sum(dim=0)
        norm = float(total.norm())
        if not math.isfinite(norm):
            raise FloatingPointError("the operator noise contains NaN/Inf")
        if norm <= 0.0:
            raise RuntimeError("the operator noise is zero (the probes' Jacobians vanish)")
        total.mul_(math.sqrt(energy) / norm)
        buf.copy_(total.to(device=buf.device, dtype=buf.dtype))
        return params

    def _draw(self, plan: GradientPlan, spec: Spectrum | None, grad_energy: float, buf: Tensor,
              wrote: bool = False) -> bool:
        """Write one draw of the plan's Gaussian noise, for a gradient of energy ``grad_energy``, into ``buf``
        (added to it when ``wrote``: ``buf`` already holds operator noise); returns False (``buf`` untouched)
        when nothing was written.

        Equivalent to ``shaped_noise(U, τ·‖ḡ‖², source).sum(0)`` over the probes (plus the isotropic part),
        computed as one vector-matrix product with the cached left vectors that receive noise (at most
        ``P·k`` rows of length ``m``): the hot path of every step.
        """
        if plan.shaped is not None and spec is not None and spec.left_vectors is not None:
            cache = self._basis_t
            if cache is None or cache[0].dtype != buf.dtype or cache[0].device != buf.device:
                # Only directions that receive noise matter: water-filling leaves the strongest (and, with
                # the reference precision, the weakest) at zero.
                P, m, k = spec.left_vectors.shape
                unit = plan.shaped.reshape(-1)
                keep = (unit > 0).nonzero().squeeze(1)
                basis_t = spec.left_vectors.permute(0, 2, 1).reshape(P * k, m)[keep]
                cache = (basis_t.to(device=buf.device, dtype=buf.dtype).contiguous(),
                         unit[keep].sqrt().to(device=buf.device, dtype=buf.dtype))
                self._basis_t = cache
            basis_t, unit_std = cache
            if unit_std.numel():
                z = self.noise.normal((unit_std.numel(),), buf.dtype, buf.device)
                z.mul_(unit_std).mul_(math.sqrt(grad_energy))
                torch.matmul(z.unsqueeze(0), basis_t, out=buf.view(1, -1))
                wrote = True
        if plan.isotropic > 0:
            iso = self.noise.normal((buf.numel(),), buf.dtype, buf.device)
            std = math.sqrt(plan.isotropic * grad_energy)
            if wrote:
                buf.add_(iso, alpha=std)
            else:
                torch.mul(iso, std, out=buf)
            wrote = True
        return wrote

    def _emit(self, params: list[Tensor], buf: Tensor, views: list[Tensor], grad_energy: float,
              into: Tensor | None) -> float:
        """Release the noise in ``buf``: into the gradients, or into ``into``; its relative energy."""
        if into is None:
            return self._release(params, buf, views, grad_energy)
        into.copy_(buf.to(into.dtype))
        b64 = buf.double()
        return float(torch.dot(b64, b64)) / grad_energy if grad_energy > 0 else 0.0

    @staticmethod
    def _release(params: list[Tensor], buf: Tensor, views: list[Tensor], grad_energy: float) -> float:
        """Add the noise in ``buf`` to the gradients in place; returns its energy relative to ``grad_energy``."""
        with torch.no_grad():
            grads, pieces = [], []
            for p, v in zip(params, views):
                if p.grad is None:
                    p.grad = v.to(p.dtype).clone()
                elif p.grad.dtype == v.dtype:
                    grads.append(p.grad)
                    pieces.append(v)
                else:
                    p.grad.add_(v.to(p.grad.dtype))
            if grads:
                torch._foreach_add_(grads, pieces)
        b64 = buf.double()
        return float(torch.dot(b64, b64)) / grad_energy if grad_energy > 0 else 0.0

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counters, tracked spectrum and noise plan, noise and probe generator states."""
        warm = self.estimator.previous
        return {
            "step": self.step,
            "next_refresh": self._next_refresh,
            "failures": self._failures,
            "last_failure": self._last_failure,
            "noise": self.noise.state_dict(),
            "probe_generator": self.probe_generator.get_state(),
            "spectrum": None if self._spectrum is None else self._spectrum.state_dict(),
            "warm_spectrum": None if warm is self._spectrum or warm is None else warm.state_dict(),
            "plan": None if self._plan is None else self._plan.state_dict(),
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step = int(state["step"])
        self.noise.load_state_dict(state["noise"])
        self.probe_generator.set_state(state["probe_generator"])
        self._spectrum = None if state["spectrum"] is None else Spectrum.from_state(state["spectrum"])
        self._basis_t = None
        warm = state.get("warm_spectrum")
        self.estimator.accept(self._spectrum if warm is None else Spectrum.from_state(warm))
        self._next_refresh = int(state.get("next_refresh", self.step if self._spectrum is None else 0))
        self._failures = int(state.get("failures", 0))
        self._last_failure = str(state.get("last_failure", ""))
        p = state.get("plan")
        # A checkpoint from before plans said how much operator noise they carry: re-plan at the next step.
        self._plan = None if p is None or "operator_budget" not in p else GradientPlan.from_state(p)
        if self._plan is None and self._spectrum is not None:
            self._next_refresh = self.step  # an old checkpoint without a (current) plan: re-plan at the next step
        if state.get("ledger") is not None:
            self.ledger.load_state_dict(state["ledger"])


def _checked_energy(energy: float) -> float:
    value = float(energy)
    if not math.isfinite(value) or value < 0:
        raise DefenseError(f"invdefend.GradientDefense: energy={energy!r} must be a finite number >= 0; nothing was "
                           "released")
    return value


class DefendedOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step()`` first lets a defense protect the gradients, then steps the wrapped one.

    It shares ``param_groups``, ``state`` and ``defaults`` with the wrapped optimizer, so learning-rate
    schedulers and checkpoints of either see the same thing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, defense: GradientDefense) -> None:
        # Deliberately not calling Optimizer.__init__: the wrapped optimizer owns the parameter groups.
        self.original_optimizer = optimizer
        self.defense = defense
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = getattr(optimizer, "_optimizer_state_dict_pre_hooks", {})
        self._optimizer_state_dict_post_hooks = getattr(optimizer, "_optimizer_state_dict_post_hooks", {})
        self._optimizer_load_state_dict_pre_hooks = getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {})
        self._optimizer_load_state_dict_post_hooks = getattr(optimizer, "_optimizer_load_state_dict_post_hooks", {})

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Protect the gradients, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_coverage()
        self.defense.protect()
        self.original_optimizer.step()
        return loss

    def check_coverage(self) -> None:
        """Refuse (:class:`DefenseError`) a step whose optimizer would step a parameter the defense does not
        noise (see :meth:`GradientDefense.check_coverage`)."""
        self.defense.check_coverage((p for g in self.param_groups for p in g["params"]), "DefendedOptimizer")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (the defense's is :meth:`GradientDefense.state_dict`)."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer's state."""
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DefendedOptimizer({self.original_optimizer!r}, mechanism={self.defense.mechanism})"
