"""Spectral noise on shared embeddings (vertical FL, split learning) — THEORY §5.

:class:`EmbeddingDefense` is a removable forward hook on the client's bottom model: every embedding it
sends gets per-sample noise shaped in that sample's own left singular basis of ``∂h/∂x``::

    defense = EmbeddingDefense(bottom, budget=0.1).attach()   # bottom(x) now returns h(x) + noise
    ...
    defense.detach()                                          # the hook is gone

The embedding is small (``m`` ≪ ``d``), so by default the full Jacobian is built from ``m`` VJPs per sample
and the allocation uses the whole spectrum; past ``exact_max_dim`` the top-k estimator is used.
The noise is a constant added to the output, so gradients still flow to the bottom model and the top
model trains on the noisy embeddings. Fails closed like :class:`~invdefend.defense.GradientDefense`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..jacobian import embedding_jacobian
from ..mechanisms import NoiseSource, make_noise_source, shaped_noise, water_filling, water_filling_for_target
from ..monitor import ReleaseRecord, RiskMonitor
from ..risk import DEFAULT_RHO, NoiseModel, default_prior_variance, invloss, leakage, predicted_psnr
from ..spectral import Spectrum, exact_spectrum, topk_spectrum
from .common import (
    DefenseError, check_batch, check_budget, check_model, check_noise_settings, estimator_error, target_invloss,
)

__all__ = ["EmbeddingDefense"]


class EmbeddingDefense:
    """Adaptive per-sample spectral noise on the embeddings a bottom model sends.

    Args:
        bottom: the client's model up to the cut layer; its output ``(B, ...)`` is the embedding.
        budget: per-sample noise energy relative to ``‖h(x)‖²``, > 0.
        target_psnr: if set, per sample the smallest energy (up to ``max_budget``) whose predicted PSNR is at
            most this many dB.
        floor: isotropic noise energy relative to ``‖h(x)‖²`` (0 to disable).
        mechanism: ``"spectral"``, ``"isotropic"`` (same energy, spread evenly) or ``"monitor"`` (no noise).
        k: directions estimated when ``m > exact_max_dim`` (the whole spectrum is used otherwise).
        fallback_budget: relative energy of the conservative isotropic noise on failure (default
            ``10·budget``, at least 0.5).
        active_in_eval: also protect embeddings computed in eval mode (inference also sends them).
        rho, v0, dynamic_range, generator, seed, secure_rng, monitor, writer, callbacks: as for
            :class:`~invdefend.defense.GradientDefense`.
    """

    kind = "embedding"

    def __init__(
        self,
        bottom: nn.Module,
        *,
        budget: float = 0.1,
        target_psnr: float | None = None,
        max_budget: float = 10.0,
        floor: float = 0.0,
        mechanism: Literal["spectral", "isotropic", "monitor"] = "spectral",
        k: int = 32,
        exact_max_dim: int = 256,
        max_sweeps: int = 8,
        max_residual: float = 0.5,
        fallback_budget: float | None = None,
        active_in_eval: bool = True,
        rho: float = DEFAULT_RHO,
        v0: float | None = None,
        dynamic_range: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        secure_rng: bool = False,
        monitor: RiskMonitor | None = None,
        writer: Any | None = None,
        callbacks: Iterable[Callable[[ReleaseRecord], None]] = (),
    ) -> None:
        check_noise_settings("EmbeddingDefense", mechanism, budget, max_budget, floor,
                             mechanisms=("spectral", "isotropic", "monitor"))  # no band_pass for embeddings
        if k < 1:
            raise ValueError(f"invdefend.EmbeddingDefense: k={k} must be >= 1")
        check_model("EmbeddingDefense", bottom)  # half precision: refuse now, not at every batch
        self.bottom = bottom
        self.budget = float(budget)
        self.v0 = default_prior_variance(dynamic_range) if v0 is None else float(v0)
        self.dynamic_range = float(dynamic_range)
        self.target_psnr = target_psnr
        self._target_il = None if target_psnr is None else target_invloss(target_psnr, self.dynamic_range, self.v0)
        self.max_budget = float(max_budget)
        self.floor = float(floor)
        self.mechanism = mechanism
        self.k, self.exact_max_dim, self.max_sweeps = int(k), int(exact_max_dim), int(max_sweeps)
        self.max_residual = float(max_residual)
        self.fallback_budget = float(fallback_budget) if fallback_budget is not None else max(10 * self.budget, 0.5)
        check_budget("EmbeddingDefense", "fallback_budget", self.fallback_budget)
        self.active_in_eval = active_in_eval
        self.rho = float(rho)
        self.noise: NoiseSource = make_noise_source(generator, seed, secure_rng)
        self._estimator_gen = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
        self.monitor = monitor or RiskMonitor(writer, callbacks=callbacks)
        self.step = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._busy = False
        self.estimate_hook: Callable[[], None] | None = None  # test seam: runs inside estimation
        self.last_record: ReleaseRecord | None = None

    # -- hook management ----------------------------------------------------------------------------------
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

    # -- the release --------------------------------------------------------------------------------------
    def _estimate(self, inputs: Tensor) -> Spectrum:
        self._busy = True
        try:
            with torch.enable_grad():
                op = embedding_jacobian(self.bottom, inputs)
                if op.out_dim <= self.exact_max_dim:
                    spec = exact_spectrum(op)
                else:
                    spec = topk_spectrum(op, self.k, max_sweeps=self.max_sweeps, generator=self._estimator_gen)
        finally:
            self._busy = False
        if self.estimate_hook is not None:
            self.estimate_hook()
        if not spec.is_finite():
            raise FloatingPointError("the estimated spectrum contains NaN/Inf")
        worst = estimator_error(spec)  # backward error relative to σ₁², as for GradientDefense
        if not math.isfinite(worst) or worst > self.max_residual:
            raise RuntimeError(f"the estimator did not converge (error {worst:.3g} > max_residual {self.max_residual})")
        return spec

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
        t0 = time.perf_counter()
        try:
            spec = self._estimate(inputs.detach())
        except Exception as exc:  # fail closed
            fallback_reason = f"{type(exc).__name__}: {exc}"
        estimate_seconds = time.perf_counter() - t0
        extra: dict[str, Any] = {}
        target_reached = None
        fallback = spec is None and self.mechanism != "monitor"
        if spec is None and not fallback:  # monitor mode: no noise by request, the failure is recorded
            delta = torch.zeros_like(h)
            relative_budget = 0.0
        elif spec is None:
            warnings.warn(
                f"invdefend.EmbeddingDefense step {self.step}: estimation failed ({fallback_reason}); "
                f"releasing with conservative isotropic noise (relative energy {self.fallback_budget})",
                RuntimeWarning,
                stacklevel=2,
            )
            var = self.fallback_budget * energy / m
            delta = var.sqrt().unsqueeze(1) * self.noise.normal((B, m), h.dtype, h.device)
            relative_budget = self.fallback_budget
        else:
            s = spec.singular_values.to(h.dtype)
            ref = (self.rho * spec.signal_norm.to(h.dtype)) ** 2 / m
            iso = self.floor * energy / m
            if self.mechanism == "isotropic":
                iso = iso + self.budget * energy / m
            tau = torch.zeros_like(s)
            if self.mechanism == "spectral":
                if self._target_il is None:
                    tau = water_filling(s, self.budget * energy, self.v0, ref + iso, iterations=60)
                else:
                    def il_of(t: Tensor) -> Tensor:
                        return invloss(spec, NoiseModel(isotropic=iso, shaped=t, rho=self.rho), v0=self.v0, tail="topk")

                    tau, reached = water_filling_for_target(
                        s, il_of, self._target_il, self.v0, ref + iso, max_energy=self.max_budget * energy
                    )
                    target_reached = bool(reached.all())
            delta = torch.zeros_like(h)
            if self.mechanism == "spectral":
                delta = delta + shaped_noise(spec.left_vectors.to(h.dtype), tau, self.noise)
            if bool((iso > 0).any()):
                delta = delta + iso.sqrt().unsqueeze(1) * self.noise.normal((B, m), h.dtype, h.device)
            relative_budget = float(((tau.sum(dim=1) + iso * m) / energy.clamp_min(1e-300)).mean())
            noisy = invloss(spec, NoiseModel(isotropic=iso, shaped=tau, rho=self.rho), v0=self.v0, tail="topk")
            clean = invloss(spec, NoiseModel(rho=self.rho), v0=self.v0, tail="topk")
            extra = dict(
                predicted_psnr=predicted_psnr(noisy, self.dynamic_range).tolist(),
                leakage=leakage(noisy, self.v0).tolist(),
                undefended_predicted_psnr=predicted_psnr(clean, self.dynamic_range).tolist(),
                singular_values=spec.singular_values.reshape(-1).double().tolist(),
                sweeps=spec.sweeps,
                max_residual=estimator_error(spec),
            )
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
            extra={"batch_size": B, "estimate_seconds": estimate_seconds},
            **extra,
        )
        self.last_record = record
        self.monitor.emit(record)
        self.step += 1
        return embeddings + delta.view_as(embeddings).to(embeddings.dtype)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter and noise/estimator generator states."""
        return {"step": self.step, "noise": self.noise.state_dict(), "estimator_generator": self._estimator_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step = int(state["step"])
        self.noise.load_state_dict(state["noise"])
        self._estimator_gen.set_state(state["estimator_generator"])
