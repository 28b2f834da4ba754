"""Noise on shared embeddings (vertical FL, split learning) — THEORY §5.

:class:`EmbeddingDefense` is a removable forward hook on the client's bottom model: every embedding it
sends gets per-sample noise of relative energy ``budget``, and a risk record priced from that sample's spectrum
of ``∂h/∂x``::

    defense = EmbeddingDefense(bottom, budget=0.1).attach()   # bottom(x) now returns h(x) + noise
    ...
    defense.detach()                                          # the hook is gone

Every batch runs the same pipeline as :class:`~invdefend.GradientDefense` — capture (the hook) → estimate →
plan → draw → record — with each sample its own probe. The embedding is small (``m`` ≪ ``d``), so by
default the whole spectrum is taken up to ``m = 256`` (``exact_max_dim``) and the top-k estimator beyond.
The noise is a constant added to the output, so gradients still flow to the bottom model and the top
model trains on the noisy embeddings. Fails closed like :class:`~invdefend.defense.GradientDefense`.

The defaults (:data:`~invdefend.defense.settings.EMBEDDING_DEFAULTS`) draw isotropic noise and price it under
the data prior fitted online on the inputs already released (``prior="online"``; the i.i.d. prior until 128
samples). ``benchmarks/embedding_frontier.py`` found no shaped placement that protects an embedding better
than isotropic noise at the same top-model accuracy; ``mechanism="spectral"`` plans the noise in each
sample's own left singular basis (water-filling), with ``prior=`` in prior-whitened coordinates.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..jacobian import embedding_jacobian
from ..monitor import HParam, ReleaseRecord, RiskMonitor
from ..noise import NoiseSource, shaped_noise
from ..noise_law import NoiseCovariance
from ..placements import NoisePlan, Placement, PlanContext
from ..spectral import Spectrum, SpectrumTracker, check_estimate
from ..whitened import WhitenedOperator
from .checks import DefenseError, check_batch, check_model, risk_fields
from .prior_source import prior_source
from .settings import DefenseSettings, SettingsAccess, pipeline_parts, settings_hparams

__all__ = ["EmbeddingDefense"]


class EmbeddingDefense(SettingsAccess):
    """Adaptive per-sample noise on the embeddings a bottom model sends.

    Args:
        bottom: the client's model up to the cut layer; its output ``(B, ...)`` is the embedding.
        settings: a :class:`~invdefend.defense.DefenseSettings` (default: the embedding defaults, see
            :data:`~invdefend.defense.settings.EMBEDDING_DEFAULTS`); any field may also be passed as a keyword.
            ``budget`` is per-sample energy relative to ``‖h(x)‖²``; ``mechanism`` is ``"spectral"``,
            ``"isotropic"``, ``"monitor"`` or a registered placement supporting embeddings; ``fallback_budget``
            defaults to ``max(10·budget, 0.5)``; ``active_in_eval`` also protects embeddings computed in eval
            mode (inference also sends them). ``max_sweeps`` is accepted for ``sweeps = cold_sweeps``.
        placement, generator, monitor, writer, callbacks: as for :class:`~invdefend.defense.GradientDefense`.
    """

    kind = "embedding"

    def __init__(
        self,
        bottom: nn.Module,
        settings: DefenseSettings | None = None,
        *,
        placement: Placement | None = None,
        generator: torch.Generator | None = None,
        monitor: RiskMonitor | None = None,
        writer: Any | None = None,
        callbacks: Iterable[Callable[[ReleaseRecord], None]] = (),
        **overrides: Any,
    ) -> None:
        if "max_sweeps" in overrides:  # the embedding estimate is always cold: one sweep limit
            overrides["sweeps"] = overrides["cold_sweeps"] = overrides.pop("max_sweeps")
        parts = pipeline_parts("EmbeddingDefense", self.kind, settings, overrides, placement, generator)
        check_model("EmbeddingDefense", bottom)  # half precision: refuse now, not at every batch
        self.settings = s = parts.settings
        self.bottom = bottom
        self.placement: Placement = parts.placement
        self.noise: NoiseSource = parts.noise
        self.estimator_generator = parts.generator
        self.prior_source = prior_source("EmbeddingDefense", self.settings.prior)
        self.estimator = SpectrumTracker(
            s.k, exact_max_dim=s.exact_max_dim, oversample=s.oversample, sweeps=s.sweeps, cold_sweeps=s.cold_sweeps,
            max_residual=s.max_residual, warm_start=False, generator=self.estimator_generator,
        )
        self.monitor = monitor or RiskMonitor(writer, callbacks=callbacks)
        self.step = 0
        self.last_record: ReleaseRecord | None = None
        self._laws: list[NoiseCovariance] | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._busy = False
        self._hparams_written = False

    @property
    def mechanism(self) -> str:
        """The placement's registered name."""
        return self.placement.name

    def noise_law(self) -> list[NoiseCovariance | None] | None:
        """The law of the noise the last batch carried: one :class:`~invdefend.noise_law.NoiseCovariance` per
        sample (its own basis and variances; None for a sample that got no noise, and None for the batch
        before any batch or when no noise was added). A fallback batch's laws are isotropic."""
        return self._laws

    def hparams(self) -> dict[str, HParam]:
        """The settings as TensorBoard hparams (``str``/``int``/``float``/``bool`` only), with the placement,
        the resolved ``floor`` and the prior's kind (``"iid"``, ``"data"``, ``"online"``)."""
        return settings_hparams(self.settings, self.kind, self.placement, self.prior_source.label)

    # -- capture (the hook) -------------------------------------------------------------------------------
    def attach(self) -> "EmbeddingDefense":
        """Register the forward hook on the bottom model; returns self."""
        if self._handle is None:
            self._handle = self.bottom.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook; the bottom model then returns clean embeddings again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        """Whether the hook is installed."""
        return self._handle is not None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._busy or (not module.training and not self.active_in_eval):
            return None  # the estimator's own evaluations of the bottom model pass through untouched
        if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
            return None  # a Jacobian of the bottom model (InvRE, an audit): the noise is a constant, J is unchanged
        if not args or not isinstance(args[0], Tensor):
            raise DefenseError("invdefend.EmbeddingDefense: the bottom model's first argument must be the input tensor")
        if not isinstance(output, Tensor):
            raise DefenseError(
                f"invdefend.EmbeddingDefense: the bottom model returned {type(output).__name__}, not one embedding "
                "tensor (B, ...); attach the defense to the submodule whose output is sent"
            )
        return self.protect(args[0], output)

    # -- estimate and plan --------------------------------------------------------------------------------
    def estimate(self, inputs: Tensor) -> Spectrum:
        """Every sample's spectrum of ``∂h/∂x`` by :attr:`estimator`, trusted
        (:func:`~invdefend.spectral.check_estimate`) or raising."""
        self._busy = True
        try:
            prior = self.prior_source.current()
            with torch.enable_grad():
                op = embedding_jacobian(self.bottom, inputs)
                spec = self.estimator.estimate(op if prior is None else WhitenedOperator(op, prior))
        finally:
            self._busy = False
        return check_estimate(spec, self.max_residual)

    def plan_for(self, spec: Spectrum, energy: Tensor) -> NoisePlan:
        """Each sample's plan (absolute variances) for signal energies ``‖h_b‖²`` ``(B,)``."""
        v0 = 1.0 if spec.whitened else self.v0  # whitened coordinates have unit prior variance
        return self.placement.plan(PlanContext(spec, 1.0, energy, 1, v0, self.rho, energy.dtype))

    # -- the release --------------------------------------------------------------------------------------
    def protect(self, inputs: Tensor, embeddings: Tensor) -> Tensor:
        """``embeddings + noise`` for a batch whose clean embeddings are ``bottom(inputs)``; records it."""
        check_batch("EmbeddingDefense", inputs)
        if embeddings.shape[0] != inputs.shape[0]:
            raise DefenseError(
                f"invdefend.EmbeddingDefense: {inputs.shape[0]} inputs but {embeddings.shape[0]} embeddings; "
                "the bottom model must map each sample to one embedding"
            )
        h = embeddings.detach().reshape(embeddings.shape[0], -1)
        if not torch.isfinite(h).all():
            raise DefenseError(
                "invdefend.EmbeddingDefense: the embeddings contain NaN/Inf, nothing was released; check the "
                "bottom model's inputs and weights"
            )
        B, m = h.shape
        energy = h.double().pow(2).sum(dim=1).to(h.dtype)  # (B,)
        fallback_reason = ""
        spec: Spectrum | None = None
        plan: NoisePlan | None = None
        t0 = time.perf_counter()
        prior_label = self.prior_source.label
        try:
            spec = self.estimate(inputs.detach())
            plan = self.plan_for(spec, energy)
        except Exception as exc:  # fail closed
            fallback_reason = f"{type(exc).__name__}: {exc}"
            spec, plan = None, None
        estimate_seconds = time.perf_counter() - t0
        fields: dict[str, Any] = {}
        target_reached = None
        fallback = plan is None and self.placement.adds_noise
        self._laws = None
        if plan is None and not fallback:  # monitor mode: no noise by request, the failure is recorded
            delta = torch.zeros_like(h)
            relative_budget = 0.0
        elif plan is None:
            warnings.warn(
                f"invdefend.EmbeddingDefense step {self.step}: estimation failed ({fallback_reason}); "
                f"releasing with conservative isotropic noise (relative energy {self.fallback_budget})",
                RuntimeWarning,
                stacklevel=2,
            )
            var = self.fallback_budget * energy / m
            delta = var.sqrt().unsqueeze(1) * self.noise.normal((B, m), h.dtype, h.device)
            relative_budget = self.fallback_budget
            self._laws = [NoiseCovariance(sigma2_iso=float(v)) for v in var]
        else:
            assert spec is not None
            target_reached = plan.target_reached
            tau = plan.shaped if plan.shaped is not None else torch.zeros_like(spec.singular_values.to(h.dtype))
            iso = plan.isotropic
            delta = torch.zeros_like(h)
            if plan.shaped is not None:
                delta = delta + shaped_noise(spec.left_vectors.to(h.dtype), plan.shaped, self.noise)
            if bool((iso > 0).any()):
                delta = delta + iso.sqrt().unsqueeze(1) * self.noise.normal((B, m), h.dtype, h.device)
            relative_budget = float(((tau.sum(dim=1) + iso * m) / energy.clamp_min(1e-300)).mean())
            fields = risk_fields(spec, plan, rho=self.rho, v0=self.v0, dynamic_range=self.dynamic_range)
            if self.placement.adds_noise and (plan.shaped is not None or bool((iso > 0).any())):
                self._laws = [_sample_law(float(iso[b]), spec.left_vectors[b],
                                          None if plan.shaped is None else plan.shaped[b]) for b in range(B)]
        rel = (delta.double().pow(2).sum(dim=1) / energy.double().clamp_min(1e-300)).mean()
        record = ReleaseRecord(
            kind=self.kind,
            step=self.step,
            mechanism="fallback" if fallback else self.mechanism,
            relative_energy=float(rel),
            budget=relative_budget,
            refreshed=True,
            fallback=fallback,
            fallback_reason=fallback_reason,
            target_reached=target_reached,
            batch_size=B,
            estimate_seconds=estimate_seconds,
            risk_prior=prior_label,
            **fields,
        )
        self.last_record = record
        self.prior_source.observe(inputs)  # after pricing: a batch never prices itself
        if not self._hparams_written:
            self._hparams_written = True
            self.monitor.write_hparams(self.kind, self.hparams(), ["risk/predicted_psnr_max", "noise/relative_energy"])
        self.monitor.emit(record)
        self.step += 1
        return embeddings + delta.view_as(embeddings).to(embeddings.dtype)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter and noise/estimator generator states."""
        return {"step": self.step, "noise": self.noise.state_dict(),
                "estimator_generator": self.estimator_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step = int(state["step"])
        self.noise.load_state_dict(state["noise"])
        self.estimator_generator.set_state(state["estimator_generator"])


def _sample_law(isotropic: float, basis: Tensor, shaped: Tensor | None) -> NoiseCovariance | None:
    """One sample's law, or None when it got no noise at all (water-filling can leave a sample too strong to
    hide at its budget, and no floor)."""
    if shaped is None or float(shaped.max()) <= 0:
        return NoiseCovariance(sigma2_iso=isotropic) if isotropic > 0 else None
    return NoiseCovariance(sigma2_iso=isotropic, basis=basis.double(), tau=shaped.double())
