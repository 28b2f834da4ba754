"""Spectral noise on shared gradients (horizontal FL, data-parallel training) — THEORY §4.

:class:`GradientDefense` goes into an existing loop as two added lines::

    defense = GradientDefense(model, criterion, budget=0.05)   # hooks capture inputs and labels
    optimizer = defense.wrap(optimizer)                         # step() = protect gradients, then step

Every step it adds noise to the parameters' ``.grad`` before the optimizer reads them:

1. **Capture.** A forward pre-hook on the model keeps the last batch's inputs; when the criterion is an
   ``nn.Module`` a pre-hook on it keeps the targets (otherwise call :meth:`~GradientDefense.capture`, or
   use :meth:`~GradientDefense.criterion`).
2. **Estimate** (on refresh steps, every ``refresh_every``): the top-k spectrum of the per-sample
   gradient Jacobian of ``probes`` samples of the batch by block Krylov iteration, warm-started from the
   last estimate's *left* (parameter-space) subspace: the new probes start from ``Jᵀ U_prev``, because
   right (input-space) singular vectors belong to one sample while the leaking parameter directions are
   largely shared between samples and drift slowly. ``sweeps`` sweeps; if that leaves the estimate
   unconverged, up to ``cold_sweeps`` more before it counts as failed. With ``k ≥ min(d, m)`` the exact
   spectrum is computed instead.
3. **Allocate** (on refresh steps). Water-filling per probe sample at the budget — or the smallest budget
   whose predicted PSNR reaches ``target_psnr`` — in per-sample units: with the attacker knowing the rest
   of a batch of ``B``, noise on the mean gradient counts ``B²`` times for one sample. The allocation is
   kept as variances *per unit of* ``‖ḡ‖²``, so the steps in between only rescale it.
4. **Release** (every step). ``δ = Σ_j U_j (√(τ_j·‖ḡ‖²) ⊙ z_j)`` over the probes (each in its own top-k
   left singular subspace) plus an optional isotropic floor ``√(floor·‖ḡ‖²/m)·z``:
   ``E‖δ‖² = (budget + floor)·‖ḡ‖²`` for the step's own mean gradient ``ḡ``. Between refreshes this
   costs one ``(m × probes·k)`` product and a few norms.
5. **Record** risk, energy and estimator health to a :class:`~invdefend.monitor.RiskMonitor`.

Mechanisms: ``"spectral"`` (the above: water-filling on the tracked top-k subspace), ``"band_pass"``,
``"isotropic"`` (the same energy spread evenly, the DP-SGD-like baseline) and ``"monitor"`` (no noise).

**Band-pass** (``mechanism="band_pass"``, ``docs/frontier.md``): at *every* step, ``probes`` samples of the
current batch are drawn and each gets matrix-function noise ``J·(JᵀJ + μ)⁻¹·w``, ``w ~ N(0, I_d)``
(:func:`~invdefend.mechanisms.band_pass_noise`: variance ``∝ s_i²/(s_i² + μ)²`` along ``u_i``, ``μ`` the
``band_pass_quantile`` quantile of the sample's non-zero ``s_i²``, estimated by the same Lanczos run); their
sum is rescaled to energy exactly ``budget·‖ḡ‖²`` and the isotropic ``floor`` is added. The noise lies in
the range of the current batch's Jacobians, which top-k water-filling noise shares with the signal only
in a few directions a defense-aware attacker whitens away; with a floor of about the same energy it is
the best placement of the frontier study against DLG, Inverting Gradients and that attacker. Recommended:
``GradientDefense(model, loss, mechanism="band_pass", budget=E/2, floor=E/2)``. It costs
``probes × band_pass_steps`` Jacobian-vector/vector-Jacobian product pairs at *every* step (48 at the
defaults), far more than ``"spectral"`` between refreshes. Refresh steps still estimate the top-k spectrum
for the risk record, which is conservative: it counts only the floor (and the attacker's reference
precision), not the band-pass noise (``extra["risk_noise_model"] = "floor_only"``). A band-pass draw that
raises, is NaN/Inf or is zero releases that step under the fallback noise below. A failed top-k estimate
does not change the band-pass noise (which needs no spectrum): it warns, records
``extra["risk_estimate_failed"]`` and no risk until a later estimate succeeds.

**Fail closed.** If estimation raises, returns NaN/Inf, or does not converge (its estimator error — the
largest Ritz residual ``‖JᵀJv − σ²v‖`` relative to the top ``σ₁²``, i.e. the backward error — stays above
``max_residual``), no spectrum is trusted until a later estimate succeeds: every step in between is
released with isotropic noise of energy ``fallback_budget·‖ḡ‖²``, warns (``RuntimeWarning``) and is
recorded with ``fallback=True``. A failed estimate is retried after 1, 2, 4, … steps (at most
``refresh_every``). A gradient that is itself NaN/Inf, or a missing capture, raises
:class:`~invdefend.defense.DefenseError`: no update leaves unprotected. In ``mechanism="monitor"`` (no
noise by request) a failed estimate is recorded and warned about, and no noise is added.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..jacobian import gradient_jacobian, trainable_parameters
from ..mechanisms import NoiseSource, band_pass_noise, make_noise_source, water_filling, water_filling_for_target
from ..monitor import ReleaseRecord, RiskMonitor
from ..risk import DEFAULT_RHO, NoiseModel, default_prior_variance, invloss, leakage, predicted_psnr
from ..spectral import Spectrum, exact_spectrum, topk_spectrum
from .common import (
    DefenseError, check_batch, check_budget, check_model, check_noise_settings, estimator_error, spectrum_from_state,
    spectrum_state, target_invloss,
)

__all__ = ["GradientDefense", "DefendedOptimizer"]

Mechanism = Literal["spectral", "band_pass", "isotropic", "monitor"]


@dataclass
class _NoisePlan:
    """The allocation decided at the last refresh, per unit of the released gradient's energy ``‖ḡ‖²``.

    ``shaped[j, i]`` is the variance along probe ``j``'s ``i``-th left singular vector of the noise on the
    *mean* gradient, divided by ``‖ḡ‖²``; ``isotropic`` the same for every coordinate.
    """

    shaped: Tensor | None  # (P, k) float64, or None when no noise is shaped
    isotropic: float
    relative_budget: float  # E‖δ‖² / ‖ḡ‖²
    target_reached: bool | None


class GradientDefense:
    """Adaptive spectral noise on the gradients a model shares.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean reduction). If it is an ``nn.Module`` its
            targets are captured by a hook; otherwise call :meth:`capture` (or use :meth:`criterion`).
        budget: noise energy relative to ``‖ḡ‖²`` (the released mean gradient's), > 0.
        target_psnr: if set, each refresh uses the smallest energy (up to ``max_budget``) whose predicted
            PSNR of every probe sample is at most this many dB; ``budget`` is then unused.
        max_budget: the largest relative energy target mode may use.
        floor: isotropic noise energy relative to ``‖ḡ‖²`` added everywhere (0 to disable).
        mechanism: ``"spectral"`` (water-filling), ``"band_pass"`` (matrix-function noise in the range of the
            current batch's Jacobians, redrawn at every step; see below), ``"isotropic"`` (the same energy
            spread evenly, the DP-SGD-like baseline), or ``"monitor"`` (no noise; risk is still estimated and
            logged).
        k: singular triplets tracked per probe sample. With ``k >= min(d, m)`` the exact, complete spectrum
            is computed (``d`` products; small inputs such as 8x8 digits). Otherwise the risk is recorded
            with the conservative top-k tail (unheld directions counted at ``s_k``), which then dominates it.
        probes: samples of each batch whose spectrum is estimated at a refresh (and, with ``"band_pass"``,
            that receive band-pass noise at every step).
        refresh_every: steps between refreshes (the subspace and allocation are reused in between). A
            refresh costs about 20 plain batch-32 steps of a LeNet at the defaults (``benchmarks/overhead.py``),
            so the default 100 keeps the amortised cost near 1.3x a plain step.
        sweeps: estimator sweeps at a warm-started refresh; ``cold_sweeps`` at most for a cold one (and
            at most that many more when a warm one is unconverged).
        oversample: extra columns of the estimator's block (``k + oversample`` vectors per sweep).
        max_residual: estimator error (backward error relative to ``σ₁²``) above which an estimate
            counts as failed (fail closed).
        fallback_budget: relative energy of the conservative isotropic noise (default ``10·budget``,
            at least 0.1).
        band_pass_steps: Lanczos steps per probe of each band-pass draw (``"band_pass"`` only), >= 1.
        band_pass_quantile: ``μ`` of the band-pass law as this quantile, in (0, 1), of each probe's non-zero
            ``s_i²`` (``"band_pass"`` only).
        rho, v0, dynamic_range: risk-model settings (see :mod:`invdefend.risk`).
        mode: model mode for the Jacobian (``"eval"`` default).
        generator, seed, secure_rng: the noise source (see :mod:`invdefend.mechanisms`); ``seed`` also
            seeds the probe choice.
        monitor: a :class:`RiskMonitor`; or pass ``writer``/``callbacks`` to build one.
        capture: install the capture hooks now (else call :meth:`attach` or :meth:`capture`).

    ``mechanism="band_pass"``: every step, ``probes`` samples of the *current* batch (chosen by the probe
    generator) get :func:`~invdefend.mechanisms.band_pass_noise` with ``μ`` chosen per sample at
    ``band_pass_quantile``; the sum is rescaled to energy exactly ``budget·‖ḡ‖²`` and the isotropic floor
    (``floor·‖ḡ‖²`` expected) is added, so the released relative energy is ``budget + floor`` in expectation
    (``record.budget``). Cost: ``probes × band_pass_steps`` JVP/VJP pairs at every step. Recommended:
    ``GradientDefense(model, loss, mechanism="band_pass", budget=E/2, floor=E/2)``. The recorded risk is
    deliberately conservative (it over-states, never under-states, the leakage): it is evaluated with the
    floor and the reference precision only, ignoring the band-pass noise (``record.extra["risk_noise_model"]
    == "floor_only"``), so with ``floor=0`` it equals the undefended prediction. The ``μ`` used by each probe
    is logged in ``record.extra["band_pass_mu"]``. Target mode is not available (pass ``budget=``).
    """

    kind = "gradient"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        budget: float = 0.05,
        target_psnr: float | None = None,
        max_budget: float = 1.0,
        floor: float = 0.0,
        mechanism: Mechanism = "spectral",
        k: int = 8,
        probes: int = 2,
        refresh_every: int = 100,
        sweeps: int = 2,
        cold_sweeps: int = 6,
        oversample: int = 4,
        max_residual: float = 0.5,
        fallback_budget: float | None = None,
        rho: float = DEFAULT_RHO,
        v0: float | None = None,
        dynamic_range: float = 1.0,
        mode: Literal["eval", "train"] = "eval",
        band_pass_steps: int = 24,
        band_pass_quantile: float = 0.25,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        secure_rng: bool = False,
        monitor: RiskMonitor | None = None,
        writer: Any | None = None,
        callbacks: Iterable[Callable[[ReleaseRecord], None]] = (),
        capture: bool = True,
    ) -> None:
        check_noise_settings("GradientDefense", mechanism, budget, max_budget, floor)
        for name, value in (("k", k), ("probes", probes), ("refresh_every", refresh_every), ("sweeps", sweeps),
                            ("cold_sweeps", cold_sweeps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"invdefend.GradientDefense: {name}={value!r} must be an integer >= 1")
        if isinstance(oversample, bool) or int(oversample) != oversample or oversample < 0:
            raise ValueError(f"invdefend.GradientDefense: oversample={oversample!r} must be an integer >= 0")
        if not (isinstance(max_residual, (int, float)) and max_residual > 0 and math.isfinite(max_residual)):
            raise ValueError(f"invdefend.GradientDefense: max_residual={max_residual!r} must be a finite number > 0")
        if mode not in ("eval", "train"):
            raise ValueError(f"invdefend.GradientDefense: mode={mode!r}; choose 'eval' or 'train'")
        if isinstance(band_pass_steps, bool) or not isinstance(band_pass_steps, (int, float)) \
                or int(band_pass_steps) != band_pass_steps or band_pass_steps < 1:
            raise ValueError(
                f"invdefend.GradientDefense: band_pass_steps={band_pass_steps!r} must be an integer >= 1"
            )
        if isinstance(band_pass_quantile, bool) or not isinstance(band_pass_quantile, (int, float)) \
                or not 0.0 < band_pass_quantile < 1.0:
            raise ValueError(
                f"invdefend.GradientDefense: band_pass_quantile={band_pass_quantile!r} must be a number in "
                "(0, 1) (e.g. 0.25: μ at the 25th percentile of the non-zero s²)"
            )
        if mechanism == "band_pass" and target_psnr is not None:
            raise ValueError(
                f"invdefend.GradientDefense: target_psnr={target_psnr!r} is not available with "
                "mechanism='band_pass' (its recorded risk ignores the band-pass noise, so no budget can be "
                "shown to reach a target); pass budget= (and floor=) instead"
            )
        trainable_parameters(model)  # all frozen: nothing is shared, refuse now
        check_model("GradientDefense", model)  # half precision: refuse now, not at every step
        self.model = model
        self.loss_fn = loss_fn
        self.budget = float(budget)
        self.v0 = default_prior_variance(dynamic_range) if v0 is None else float(v0)
        self.dynamic_range = float(dynamic_range)
        self.target_psnr = target_psnr
        self._target_il = None if target_psnr is None else target_invloss(target_psnr, self.dynamic_range, self.v0)
        self.max_budget = float(max_budget)
        self.floor = float(floor)
        self.mechanism = mechanism
        self.k, self.probes, self.refresh_every = int(k), int(probes), int(refresh_every)
        self.sweeps, self.cold_sweeps, self.oversample = int(sweeps), int(cold_sweeps), int(oversample)
        self.max_residual = float(max_residual)
        self.fallback_budget = float(fallback_budget) if fallback_budget is not None else max(10 * self.budget, 0.1)
        check_budget("GradientDefense", "fallback_budget", self.fallback_budget)
        self.rho = float(rho)
        self.mode = mode
        self.band_pass_steps, self.band_pass_quantile = int(band_pass_steps), float(band_pass_quantile)
        self.noise: NoiseSource = make_noise_source(generator, seed, secure_rng)
        self._probe_gen = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
        self.monitor = monitor or RiskMonitor(writer, callbacks=callbacks)
        self.step = 0
        self._spectrum: Spectrum | None = None  # the probes' spectrum in force (None: no trusted estimate)
        self._warm: Spectrum | None = None  # the last successful estimate, to warm-start the next one
        self._plan: _NoisePlan | None = None
        self._basis_t: tuple[Tensor, Tensor] | None = None  # (noised left vectors as rows, their unit std devs)
        self._buf: tuple[tuple, Tensor, list[Tensor]] | None = None  # flat noise buffer and per-parameter views
        self._next_refresh = 0
        self._failures = 0  # consecutive failed estimates
        self._last_failure = ""
        self._inputs: Tensor | None = None
        self._targets: Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._busy = False
        self.estimate_hook: Callable[[], None] | None = None  # test seam: runs inside estimation
        self.last_record: ReleaseRecord | None = None
        if capture:
            self.attach()

    @property
    def spectrum(self) -> Spectrum | None:
        """The probes' spectrum the noise is currently shaped on (None before the first estimate or after a
        failed one, while steps are released with fallback noise)."""
        return self._spectrum

    # -- capture ------------------------------------------------------------------------------------------
    def attach(self) -> "GradientDefense":
        """Install the capture hooks (done by the constructor unless ``capture=False``); returns self."""
        if self._hooks:
            return self
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_inputs))
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

    def _capture_targets(self, module: nn.Module, args: tuple) -> None:
        if self._busy:
            return
        if len(args) >= 2 and isinstance(args[1], Tensor):
            self._targets = args[1].detach()

    def capture(self, inputs: Tensor, targets: Tensor) -> None:
        """Tell the defense which batch produced the current gradients (for function losses)."""
        self._inputs, self._targets = inputs.detach(), targets.detach()

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

    # -- estimation and allocation ------------------------------------------------------------------------
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

    @contextlib.contextmanager
    def _probe_operator(self, inputs: Tensor, targets: Tensor) -> Iterator[Any]:
        """The per-sample gradient Jacobian of ``probes`` samples of the batch, drawn by the probe generator.

        Inside the block gradients are enabled and the capture hooks ignore the forwards the operator's
        products run (they are not the user's batch).
        """
        n = int(inputs.shape[0])
        idx = torch.randperm(n, generator=self._probe_gen)[: min(self.probes, n)]
        self._busy = True
        try:
            with torch.enable_grad():
                yield gradient_jacobian(self.model, self.loss_fn, inputs[idx], targets[idx], mode=self.mode)
        finally:
            self._busy = False

    def _estimate(self, inputs: Tensor, targets: Tensor) -> Spectrum:
        """The probes' top-k spectrum, warm-started; raises if it cannot be trusted."""
        with self._probe_operator(inputs, targets) as op:
            if self.k >= min(op.in_dim, op.out_dim):
                # k covers the whole rank: min(d, m) products give the exact, complete spectrum.
                spec = replace(exact_spectrum(op), extra={"start": "exact"})
                warm = False
            else:
                init, warm = self._warm_start(op)
                spec = topk_spectrum(
                    op, self.k, oversample=self.oversample,
                    max_sweeps=self.sweeps if warm else self.cold_sweeps, init=init, generator=self._probe_gen,
                )
                spec.extra["start"] = "warm" if warm else "cold"
            if warm and spec.is_finite() and estimator_error(spec) > self.max_residual:
                # Tracking lost (the spectrum moved): keep iterating from where the warm sweeps got.
                more = topk_spectrum(
                    op, self.k, oversample=self.oversample, max_sweeps=self.cold_sweeps, tol=self.max_residual,
                    init=spec, generator=self._probe_gen,
                )
                spec = replace(more, sweeps=spec.sweeps + more.sweeps, extra={**more.extra, "start": "warm+extended"})
        if self.estimate_hook is not None:
            self.estimate_hook()
        if not spec.is_finite():
            raise FloatingPointError("the estimated spectrum contains NaN/Inf")
        err = estimator_error(spec)
        if not math.isfinite(err) or err > self.max_residual:
            raise RuntimeError(
                f"the estimator did not converge in {spec.sweeps} sweeps (error {err:.3g} > max_residual "
                f"{self.max_residual})"
            )
        return spec

    def _warm_start(self, op: Any) -> tuple[Tensor | None, bool]:
        """Starting right vectors for the new probes from the last estimate's *left* subspace.

        The probes change at every refresh, and input-space (right) singular vectors are specific to a
        sample; the parameter-space (left) subspace where the noise lives is largely shared between
        samples and drifts slowly with the weights. So the new probes start from ``Jᵀ U_prev`` — the input
        directions that produce the previous leaking directions — at the cost of one ``Jᵀ`` product.
        Returns ``(init, warm)``; ``(None, False)`` for a cold start.
        """
        prev = self._warm
        if prev is None or prev.left_vectors is None or prev.out_dim != op.out_dim or prev.in_dim != op.in_dim:
            return None, False
        U = prev.left_vectors.to(device=op.device, dtype=op.dtype)
        pick = torch.arange(op.batch_size) % U.shape[0]
        V0 = op.rmatvec(U[pick][:, :, : self.k + self.oversample])
        if not bool(torch.isfinite(V0).all()):
            return None, False
        return V0, True

    def _plan_for(self, spec: Spectrum, batch: int, grad_energy: float) -> tuple[_NoisePlan, Tensor, Tensor]:
        """The noise plan for ``spec``, and the per-sample effective variances ``(tau (P, k), iso (P,))``
        on which the recorded risk is evaluated."""
        P, m = spec.batch_size, spec.out_dim
        s = spec.singular_values.double()
        scale = float(batch) ** 2  # per-sample effective noise = B² × noise on the mean gradient
        # An all-zero gradient has no scale of its own; allocate as if it had its probes' mean energy.
        G = grad_energy if grad_energy > 0 else float(spec.signal_norm.double().pow(2).mean()) / scale
        G = max(G, 1e-300)
        ref = (self.rho * spec.signal_norm.double()) ** 2 / m
        zeros_iso = torch.zeros(P, dtype=torch.float64)
        if self.mechanism == "monitor":
            return _NoisePlan(None, 0.0, 0.0, None), torch.zeros_like(s), zeros_iso
        floor_eff = torch.full((P,), scale * self.floor * G / m, dtype=torch.float64)
        target_reached: bool | None = None
        tau = torch.zeros_like(s)
        if self.mechanism == "isotropic":
            extra = self.budget
            if self._target_il is not None:
                extra, target_reached = self._isotropic_for_target(spec, floor_eff, scale * G / m)
            iso_eff = floor_eff + scale * extra * G / m
        elif self.mechanism == "band_pass":
            # Conservative risk model ("floor_only"): the band-pass noise is left out of the recorded risk
            # (tau stays zero), which can only over-state the leakage.
            iso_eff = floor_eff
        else:
            iso_eff = floor_eff
            if self._target_il is None:
                tau = water_filling(s, scale * self.budget * G / P, self.v0, ref + floor_eff, iterations=60)
            else:
                def il_of(t: Tensor) -> Tensor:
                    return invloss(spec, NoiseModel(isotropic=floor_eff, shaped=t, rho=self.rho), v0=self.v0,
                                   tail="topk")

                cap = scale * self.max_budget * G / P
                tau, reached = water_filling_for_target(s, il_of, self._target_il, self.v0, ref + floor_eff,
                                                        max_energy=cap)
                target_reached = bool(reached.all())
        shaped = tau / (scale * G) if self.mechanism == "spectral" else None
        iso_unit = float(iso_eff[0]) / (scale * G)
        relative = (float(shaped.sum()) if shaped is not None else 0.0) + iso_unit * m
        if self.mechanism == "band_pass":
            relative += self.budget  # the band-pass part, rescaled at every step to exactly budget·‖ḡ‖²
        return _NoisePlan(shaped, iso_unit, relative, target_reached), tau, iso_eff

    def _isotropic_for_target(self, spec: Spectrum, floor_eff: Tensor, unit: float) -> tuple[float, bool]:
        """Smallest isotropic relative energy (≤ max_budget) reaching the target for every probe."""

        def reached(e: float) -> bool:
            il = invloss(spec, NoiseModel(isotropic=floor_eff + unit * e, rho=self.rho), v0=self.v0, tail="topk")
            return bool((il.double() >= self._target_il).all())

        if not reached(self.max_budget):
            return self.max_budget, False
        lo, hi = 0.0, self.max_budget
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if reached(mid) else (mid, hi)
        return hi, True

    def _risk(self, spec: Spectrum, tau: Tensor, iso_eff: Tensor) -> dict[str, Any]:
        noisy = invloss(spec, NoiseModel(isotropic=iso_eff, shaped=tau, rho=self.rho), v0=self.v0, tail="topk")
        clean = invloss(spec, NoiseModel(rho=self.rho), v0=self.v0, tail="topk")
        return dict(
            predicted_psnr=predicted_psnr(noisy, self.dynamic_range).tolist(),
            leakage=leakage(noisy, self.v0).tolist(),
            undefended_predicted_psnr=predicted_psnr(clean, self.dynamic_range).tolist(),
            singular_values=spec.singular_values.reshape(-1).double().tolist(),
            sweeps=spec.sweeps,
            max_residual=estimator_error(spec),
        )

    # -- the release ----------------------------------------------------------------------------------------
    def protect(self) -> ReleaseRecord:
        """Add the defense's noise to the model's gradients in place and record the release."""
        params = self._params()
        grad_energy = self._energy(params)
        inputs, targets = self._batch()
        batch = int(inputs.shape[0])
        m = sum(p.numel() for p in params)
        # Re-estimate now if the set of trainable parameters changed (a layer was (un)frozen): the tracked
        # subspace lives in the old parameter space.
        stale = self._spectrum is not None and self._spectrum.out_dim != m
        refreshed = self.step >= self._next_refresh or stale
        record_kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {"batch_size": batch}
        if refreshed:
            # A batch no estimate can use (empty, integer, half precision, NaN/Inf) is an error to fix, not a
            # step to release under fallback noise. Checked where the batch is used: between refreshes the
            # inputs only matter through the gradient, whose NaN/Inf _energy refuses.
            check_batch("GradientDefense", inputs)
            t0 = time.perf_counter()
            try:
                spec = self._estimate(inputs, targets)
                plan, tau, iso_eff = self._plan_for(spec, batch, grad_energy)
            except Exception as exc:  # fail closed, whatever went wrong
                self._failures += 1
                self._last_failure = f"{type(exc).__name__}: {exc}"
                self._spectrum, self._plan = None, None
                self._next_refresh = self.step + min(2 ** (self._failures - 1), self.refresh_every)
            else:
                self._failures, self._last_failure = 0, ""
                self._spectrum, self._warm, self._plan = spec, spec, plan
                self._basis_t = None
                self._next_refresh = self.step + self.refresh_every
                record_kwargs = self._risk(spec, tau, iso_eff)
                extra["estimator_start"] = spec.extra.get("start", "")
            extra["estimate_seconds"] = time.perf_counter() - t0
        plan, spec = self._plan, self._spectrum
        reason = self._last_failure
        band_pass_done = False
        if self.mechanism == "band_pass":
            extra["risk_noise_model"] = "floor_only"
            if plan is None:
                # The band-pass draw needs no spectrum: a failed top-k estimate only loses the risk record
                # (and this says so); the step is still released with band-pass noise plus the floor.
                plan = _NoisePlan(None, self.floor / m, self.budget + self.floor, None)
                extra["risk_estimate_failed"] = self._last_failure
                if refreshed:
                    warnings.warn(
                        f"invdefend.GradientDefense step {self.step}: risk estimation failed ({self._last_failure}); "
                        "no risk is recorded until a later estimate succeeds, the band-pass noise is unaffected",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            check_batch("GradientDefense", inputs)  # used at every step here: refuse an unusable batch
            buf, views = self._buffer(params)
            t0 = time.perf_counter()
            try:
                extra["band_pass_mu"] = self._band_pass_into(buf, inputs, targets, grad_energy)
            except Exception as exc:  # fail closed for this step, whatever went wrong
                reason = f"band-pass noise draw: {type(exc).__name__}: {exc}"
                plan = None
            else:
                band_pass_done = True
            extra["band_pass_seconds"] = time.perf_counter() - t0
        fallback = plan is None and self.mechanism != "monitor"
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
            rel = self._release(params, buf, views, grad_energy)
            relative_budget, target_reached = self.fallback_budget, None
        elif plan is None:  # monitor mode without a valid estimate: nothing to add, by request
            relative_budget, target_reached = 0.0, None
        else:
            buf, views = self._buffer(params)
            if self._draw(plan, spec, grad_energy, buf, wrote=band_pass_done):
                rel = self._release(params, buf, views, grad_energy)
            relative_budget, target_reached = plan.relative_budget, plan.target_reached
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
            extra=extra,
            **record_kwargs,
        )
        self.last_record = record
        self.monitor.emit(record)
        self.step += 1
        return record

    def _band_pass_into(self, buf: Tensor, inputs: Tensor, targets: Tensor, grad_energy: float) -> list[float]:
        """Write this step's band-pass noise, of energy exactly ``budget·grad_energy``, into ``buf``; returns
        the ``μ`` of each probe. Raises (``buf`` then holds nothing to release) if the draw fails, is
        NaN/Inf, or is zero."""
        with self._probe_operator(inputs, targets) as op:
            if op.out_dim != buf.numel():
                raise RuntimeError(
                    f"the Jacobian has {op.out_dim} rows but the trainable gradients {buf.numel()} entries"
                )
            delta, mu = band_pass_noise(
                op, None, 1.0, self.noise, steps=self.band_pass_steps, mu_quantile=self.band_pass_quantile,
                return_mu=True,
            )
        total = delta.detach().double().sum(dim=0)
        norm = float(total.norm())
        if not math.isfinite(norm):
            raise FloatingPointError("the band-pass noise contains NaN/Inf")
        if norm <= 0.0:
            raise RuntimeError("the band-pass noise is zero (the probes' Jacobians vanish)")
        total.mul_(math.sqrt(self.budget * grad_energy) / norm)
        buf.copy_(total.to(device=buf.device, dtype=buf.dtype))
        return [float(v) for v in mu]

    def _draw(self, plan: _NoisePlan, spec: Spectrum | None, grad_energy: float, buf: Tensor,
              wrote: bool = False) -> bool:
        """Write one draw of the plan's noise, for a gradient of energy ``grad_energy``, into ``buf`` (added
        to it when ``wrote``: ``buf`` already holds band-pass noise); returns False (``buf`` untouched) when
        nothing was written.

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
        plan = self._plan
        return {
            "step": self.step,
            "next_refresh": self._next_refresh,
            "failures": self._failures,
            "last_failure": self._last_failure,
            "noise": self.noise.state_dict(),
            "probe_generator": self._probe_gen.get_state(),
            "spectrum": spectrum_state(self._spectrum),
            "warm_spectrum": None if self._warm is self._spectrum else spectrum_state(self._warm),
            "plan": None if plan is None else {
                "shaped": plan.shaped, "isotropic": plan.isotropic, "relative_budget": plan.relative_budget,
                "target_reached": plan.target_reached,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step = int(state["step"])
        self.noise.load_state_dict(state["noise"])
        self._probe_gen.set_state(state["probe_generator"])
        self._spectrum = spectrum_from_state(state["spectrum"])
        self._basis_t = None
        warm = state.get("warm_spectrum")
        self._warm = self._spectrum if warm is None else spectrum_from_state(warm)
        self._next_refresh = int(state.get("next_refresh", self.step if self._spectrum is None else 0))
        self._failures = int(state.get("failures", 0))
        self._last_failure = str(state.get("last_failure", ""))
        p = state.get("plan")
        self._plan = None if p is None else _NoisePlan(
            shaped=p["shaped"], isotropic=float(p["isotropic"]), relative_budget=float(p["relative_budget"]),
            target_reached=p["target_reached"],
        )
        if self._plan is None and self._spectrum is not None:
            self._next_refresh = self.step  # an old checkpoint without a plan: re-plan at the next step


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
        self.defense.protect()
        self.original_optimizer.step()
        return loss

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
