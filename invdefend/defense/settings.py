"""The one settings object both defenses share, validated once, with each defense's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from ..monitor import HParam, hparam_values
from ..noise import NoiseSource, make_noise_source
from ..placements import Placement, compose, get_placement
from ..risk import DEFAULT_RHO, default_prior_variance, target_invloss
from .checks import check_placement

__all__ = [
    "settings_hparams",
    "DefenseSettings", "SettingsAccess", "PipelineParts", "pipeline_parts", "GRADIENT_DEFAULTS", "EMBEDDING_DEFAULTS",
    "check_budget",
]


def check_budget(owner: str, name: str, value: float) -> None:
    """Raise a clear error unless ``value`` is a finite relative energy > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"invdefend.{owner}: {name}={value!r} must be a finite noise energy > 0 relative to the signal's "
            "(e.g. 0.05 for 5 %); to train without noise use mechanism='monitor'"
        )


def _check_int(owner: str, name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < least:
        raise ValueError(f"invdefend.{owner}: {name}={value!r} must be an integer >= {least}")


def _check_reconstruct_probe(owner: str, kind: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"invdefend.{owner}: reconstruct_probe={value!r} must be an integer >= 0: the attack iterations of the "
            "probe reconstruction run at every refresh (e.g. 40), or 0 for none"
        )
    if value and kind != "gradient":
        raise ValueError(
            f"invdefend.{owner}: reconstruct_probe={value!r} is a GradientDefense diagnostic; an {kind} defense "
            "has no probe to reconstruct (leave it at 0)"
        )


@dataclass(frozen=True)
class DefenseSettings:
    """Every setting of :class:`~invdefend.GradientDefense` and :class:`~invdefend.EmbeddingDefense`.

    Noise:
        mechanism: the registered placement (:func:`invdefend.placements.available`): ``"spectral"``
            (water-filling on the tracked top-k subspace), ``"band_pass"`` (gradients only), ``"isotropic"``,
            ``"monitor"`` (no noise; risk still recorded), or one you registered.
        budget: noise energy relative to the signal's (``‖ḡ‖²``, or ``‖h(x)‖²`` per sample), > 0.
        target_psnr: if set, each refresh uses the least energy (up to ``max_budget``) whose predicted PSNR of
            every probe is at most this many dB; ``budget`` is then unused.
        max_budget: the largest relative energy target mode may use.
        floor: isotropic energy relative to the signal's, added everywhere (0 disables it). ``None`` (the
            default): the placement's ``default_floor_share`` of ``budget`` — half for ``mechanism="spectral"``
            on gradients, the other half shaped (at most ``1·‖ḡ‖²``; the rest of a larger budget is floor too),
            so ``budget`` stays the total energy (:meth:`energy_split`;
            without a floor a defense-aware attacker whitens the shaped noise away, THEORY §7); 0 otherwise.
        fallback_budget: relative energy of the conservative isotropic noise released when no estimate can be
            trusted (default ``max(10·budget, fallback_minimum)``).
        placement_options: extra keyword arguments of the placement class (a registered placement's own knobs).
        band_pass_steps, band_pass_quantile: the band-pass placement's Lanczos steps and quantile of ``μ``.
    Estimation:
        k: singular triplets per probe; the exact spectrum is taken when ``min(d, m) <= max(k, exact_max_dim)``
            (:func:`invdefend.spectral.use_exact`).
        probes: samples of each batch whose spectrum is estimated (gradients).
        refresh_every: steps between refreshes (gradients; the plan is reused in between).
        sweeps, cold_sweeps, oversample: the estimator's warm and cold sweep limits and extra block columns.
        max_residual: estimator error above which an estimate is not trusted (fail closed).
        mode: model mode for the Jacobian (``"eval"`` or ``"train"``).
        batch_norm: gradients, BatchNorm layers the user trains in train mode. ``"frozen"`` (default): the
            per-sample Jacobian with every such layer normalising by the batch's statistics, held as
            constants (:func:`invdefend.jacobian.batch_statistics`; one extra forward per refresh).
            ``"batch"``: the exact Jacobian of the function trained — the rest of the batch held fixed, the
            statistics moving with the sample (:func:`invdefend.jacobian.batch_gradient_jacobian`; each
            product runs the whole batch, ``B`` times the cost). ``"running"``: eval-mode running statistics
            (warns once: at the start of training they are their initial values, and the Jacobian is off by
            an order of magnitude). ``docs/theory.md`` ("BatchNorm as trained") measures the three.
    Risk model:
        rho: the reference attacker precision; v0: prior variance per input coordinate (default
        ``dynamic_range²/12``); dynamic_range: ``R`` of the inputs.
        prior: the attacker's data prior (THEORY §7): ``None`` (i.i.d. ``v0·I``; the embedding default),
            ``"online"`` (the gradient default: fitted on the batches already released,
            :class:`invdefend.prior.OnlinePrior`; priced i.i.d. until 128 samples were seen), a fitted
            :class:`~invdefend.prior.GaussianPrior` or an ``OnlinePrior``. With a prior the spectrum is that
            of the prior-whitened Jacobian and the record prices the release under the prior.
        releases_per_sample: count every sample as released this many times in the cumulative risk
            (e.g. the planned epochs) when the loader gives no sample ids (``capture(..., ids=...)``).
    Noise source:
        seed: seeds the noise and the probe choice; secure_rng: draw from ``os.urandom`` (not reproducible).
    Embeddings:
        active_in_eval: also protect embeddings computed in eval mode.
    Diagnostics (gradients):
        reconstruct_probe: attack iterations of a probe reconstruction at every refresh, 0 (the default) for
            none. ``N > 0``: at each refresh one probe sample is released alone under the noise law in force
            and attacked for ``N`` L-BFGS iterations (in chunks of 20; the defense-aware attack, or DLG without
            noise) by :func:`invdefend.probe_reconstruction.reconstruct_probe`; the monitor gets the image and
            its PSNR/SSIM/seconds (``probe/*`` tags). It runs inside ``step()``, at refreshes only; measured per
            refresh on one CPU thread (batch 16): the demo's digits CNN on 8x8 digits 0.2 s at 40 iterations,
            0.5-0.8 s at 200; LeNet on 32x32x3 patches 0.05-0.1 s at 40, 0.1 s (defense-aware, converges early)
            to 0.8 s (DLG, no noise) at 200 — about the cost of the refresh's own estimate. It never changes what
            is released; a failure only logs a warning.
    """

    mechanism: str = "spectral"
    budget: float = 0.05
    target_psnr: float | None = None
    max_budget: float = 1.0
    floor: float | None = None
    fallback_budget: float | None = None
    fallback_minimum: float = 0.1
    placement_options: dict[str, Any] = field(default_factory=dict)
    band_pass_steps: int = 24
    band_pass_quantile: float = 0.25
    k: int = 8
    probes: int = 2
    refresh_every: int = 100
    sweeps: int = 2
    cold_sweeps: int = 6
    oversample: int = 4
    exact_max_dim: int = 0
    max_residual: float = 0.5
    mode: Literal["eval", "train"] = "eval"
    batch_norm: Literal["frozen", "batch", "running"] = "frozen"
    rho: float = DEFAULT_RHO
    v0: float | None = None
    dynamic_range: float = 1.0
    prior: Any = None
    releases_per_sample: int | None = None
    seed: int | None = None
    secure_rng: bool = False
    active_in_eval: bool = True
    reconstruct_probe: int = 0

    @classmethod
    def for_kind(cls, kind: str, **overrides: Any) -> "DefenseSettings":
        """The settings of a ``"gradient"`` or ``"embedding"`` defense: its defaults, then ``overrides``
        (unknown names are refused with the list of valid ones)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"invdefend.DefenseSettings: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        defaults = GRADIENT_DEFAULTS if kind == "gradient" else EMBEDDING_DEFAULTS
        return cls(**{**defaults, **overrides})

    @classmethod
    def resolve(cls, settings: "DefenseSettings | None", kind: str, overrides: dict[str, Any]) -> "DefenseSettings":
        """``settings`` (default: ``kind``'s defaults) with ``overrides`` applied; unknown names refused."""
        if settings is None:
            return cls.for_kind(kind, **overrides)
        if not isinstance(settings, DefenseSettings):
            raise TypeError(
                f"invdefend: settings must be a DefenseSettings, got {type(settings).__name__}; pass the settings "
                "as keywords (budget=..., mechanism=...) or build DefenseSettings.for_kind(...)"
            )
        return cls.for_kind(kind, **{**_fields_of(settings), **overrides})

    def validated(self, owner: str, kind: str) -> "DefenseSettings":
        """These settings checked for ``owner`` (a ``kind`` defense), with ``v0`` and ``fallback_budget``
        resolved; a clear ``ValueError`` naming the setting otherwise."""
        cls = get_placement(self.mechanism, kind, owner)
        if getattr(cls, "adds_noise", True):
            check_budget(owner, "budget", self.budget)
        check_budget(owner, "max_budget", self.max_budget)
        floor = self.floor
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                  or not math.isfinite(floor) or floor < 0):
            raise ValueError(
                f"invdefend.{owner}: floor={floor!r} must be finite and >= 0 (0 disables it; None: half the budget "
                "with mechanism='spectral' on gradients)"
            )
        for name in ("k", "probes", "refresh_every", "sweeps", "cold_sweeps"):
            _check_int(owner, name, getattr(self, name), 1)
        for name in ("oversample", "exact_max_dim"):
            _check_int(owner, name, getattr(self, name), 0)
        mr = self.max_residual
        if isinstance(mr, bool) or not isinstance(mr, (int, float)) or not math.isfinite(mr) or mr <= 0:
            raise ValueError(f"invdefend.{owner}: max_residual={mr!r} must be a finite number > 0")
        if self.mode not in ("eval", "train"):
            raise ValueError(f"invdefend.{owner}: mode={self.mode!r}; choose 'eval' or 'train'")
        if self.batch_norm not in ("frozen", "batch", "running"):
            raise ValueError(f"invdefend.{owner}: batch_norm={self.batch_norm!r}; choose 'frozen' (the batch's "
                             "statistics as constants), 'batch' (exact, B times the cost) or 'running'")
        _check_int(owner, "band_pass_steps", self.band_pass_steps, 1)
        _check_reconstruct_probe(owner, kind, self.reconstruct_probe)
        q = self.band_pass_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise ValueError(
                f"invdefend.{owner}: band_pass_quantile={q!r} must be a number in (0, 1) (e.g. 0.25: μ at the "
                "25th percentile of the non-zero s²)"
            )
        if self.target_psnr is not None and not getattr(cls, "supports_target", True) and cls.adds_noise:
            raise ValueError(
                f"invdefend.{owner}: target_psnr={self.target_psnr!r} is not available with "
                f"mechanism={self.mechanism!r} (its recorded risk ignores part of its noise, so no budget can be "
                "shown to reach a target); pass budget= (and floor=) instead"
            )
        fallback = self.fallback_budget if self.fallback_budget is not None \
            else max(10 * float(self.budget), self.fallback_minimum)
        check_budget(owner, "fallback_budget", fallback)
        v0 = default_prior_variance(self.dynamic_range) if self.v0 is None else float(self.v0)
        if self.target_psnr is not None:
            target_invloss(self.target_psnr, float(self.dynamic_range), v0)  # out of range: refuse now
        return replace(self, v0=v0, fallback_budget=float(fallback))

    @property
    def target_invloss(self) -> float | None:
        """The InvLoss ``target_psnr`` corresponds to (None without a target)."""
        if self.target_psnr is None:
            return None
        return target_invloss(self.target_psnr, float(self.dynamic_range), self.v0)

    def energy_split(self, kind: str) -> tuple[float, float]:
        """``(shaped budget, isotropic floor)``, both relative to the signal's energy: ``floor=None`` splits
        ``budget`` by the placement's ``default_floor_share`` for this kind (a half for ``"spectral"`` on
        gradients; no floor otherwise), the shaped part at most the placement's ``default_shaped_cap`` (1 for
        ``"spectral"`` on gradients: a budget of 20 splits 1 shaped, 19 floor)."""
        if self.floor is not None:
            return float(self.budget), float(self.floor)
        cls = get_placement(self.mechanism, kind)
        budget = float(self.budget)
        shaped = (1 - cls.default_floor_share.get(kind, 0.0)) * budget
        shaped = min(shaped, cls.default_shaped_cap.get(kind, math.inf))
        return shaped, budget - shaped

    def placement(self, kind: str, owner: str) -> Placement:
        """The placement these settings describe (:func:`invdefend.placements.compose`)."""
        cls = get_placement(self.mechanism, kind, owner)
        options = {**cls.options_from(self), **self.placement_options}
        budget, floor = self.energy_split(kind)
        return compose(self.mechanism, kind=kind, budget=budget, floor=floor,
                       target_invloss=self.target_invloss, max_budget=float(self.max_budget), options=options,
                       owner=owner)


def _fields_of(settings: DefenseSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


class SettingsAccess:
    """Makes a defense's settings readable as its attributes (``defense.budget``), read-only."""

    settings: DefenseSettings

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in DefenseSettings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True)
class PipelineParts:
    """What both defense pipelines are built from: validated settings, the placement, the noise source and
    the generator of the estimator's randomness (probe choice, start blocks), seeded from ``seed + 1``."""

    settings: DefenseSettings
    placement: Placement
    noise: NoiseSource
    generator: torch.Generator


def pipeline_parts(
    owner: str,
    kind: str,
    settings: DefenseSettings | None,
    overrides: dict[str, Any],
    placement: Placement | None,
    generator: torch.Generator | None,
) -> PipelineParts:
    """Resolve and validate ``settings`` with ``overrides``, build (or check) the placement and the noise
    source, for the ``owner`` defense of ``kind``."""
    s = DefenseSettings.resolve(settings, kind, overrides).validated(owner, kind)
    chosen = placement if placement is not None else s.placement(kind, owner)
    check_placement(owner, chosen, kind)
    return PipelineParts(s, chosen, make_noise_source(generator, s.seed, s.secure_rng),
                         torch.Generator().manual_seed(0 if s.seed is None else int(s.seed) + 1))


#: :class:`~invdefend.GradientDefense`'s defaults: those of :class:`DefenseSettings`, with the data prior fitted
#: online on the batches already released (the default placement then water-fills in whitened coordinates).
GRADIENT_DEFAULTS: dict[str, Any] = {"prior": "online"}
#: :class:`~invdefend.EmbeddingDefense`'s defaults: isotropic noise, priced under the data prior fitted online
#: (``benchmarks/embedding_frontier.py``: at equal top-model accuracy no shaped placement measured protects a
#: split-learning embedding better than isotropic noise, and the i.i.d. prior under-states the risk by 5–9 dB);
#: the whole spectrum up to ``m = 256`` (embeddings are small), more budget and fallback, cold estimates of up
#: to 8 sweeps with 16 extra columns.
EMBEDDING_DEFAULTS: dict[str, Any] = dict(
    mechanism="isotropic", prior="online", budget=0.1, max_budget=10.0, k=32, exact_max_dim=256, sweeps=8,
    cold_sweeps=8, oversample=16, fallback_minimum=0.5,
)


def settings_hparams(settings: DefenseSettings, kind: str, placement: Placement, prior_label: str) -> dict[str, HParam]:
    """A defense's settings as TensorBoard hparams (``str``/``int``/``float``/``bool`` only), with its placement,
    the resolved ``floor`` and the prior's kind (the first word of ``prior_label``: ``"iid"``, ``"data"``,
    ``"online"``)."""
    return hparam_values(settings, kind=kind, mechanism=settings.mechanism, placement=type(placement).__name__,
                         floor=settings.energy_split(kind)[1], prior=prior_label.split(" ")[0])
