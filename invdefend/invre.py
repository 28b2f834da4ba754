"""InvRE: the attack-agnostic reconstruction-risk estimator over a batch, a data loader or checkpoints.

For every sample it estimates the top-k singular values of the Jacobian of what the client shares
(per-sample gradient or cut-layer embedding), a quadrature rule for the rest of the spectrum, and turns
them into InvLoss, predicted PSNR and leakage (:mod:`invdefend.risk`). Nothing in it runs an attack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .jacobian import (
    ParamSpec,
    embedding_jacobian,
    gradient_jacobian,
    select_parameters,
)
from .prior import DEFAULT_RANK, GaussianPrior
from .risk import DEFAULT_RHO, NoiseModel, RiskEstimate, default_prior_variance
from .spectral import Spectrum, estimate_spectrum
from .stats import summarise
from .subset import DEFAULT_FAILURE, DEFAULT_STEPS, RestBound, bounded_risk, rest_norm

__all__ = [
    "InvRE", "RiskReport", "estimate_gradient_spectrum", "estimate_embedding_spectrum", "summarise", "PriorChoice",
    "MIN_PRIOR_SAMPLES",
]

Target = Literal["gradient", "embedding"]
PriorChoice = GaussianPrior | Literal["auto", "iid"]

#: ``prior="auto"`` fits a data prior only when at least this many samples other than the assessed ones exist.
MIN_PRIOR_SAMPLES: int = 32
Method = Literal["auto", "subspace", "exact"]


def estimate_gradient_spectrum(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    k: int = 16,
    method: Method = "auto",
    tail: bool = False,
    init: Spectrum | Tensor | None = None,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    oversample: int = 16,
    slq_probes: int = 4,
    slq_steps: int = 24,
    mode: Literal["eval", "train"] = "eval",
    generator: torch.Generator | None = None,
    prior: GaussianPrior | None = None,
    embedding_module: str | nn.Module | None = None,
    left: bool = True,
    block: int | Literal["auto"] | None = "auto",
    params: ParamSpec | None = None,
) -> Spectrum:
    """Top-k spectrum of ``∂(per-sample gradient)/∂input`` for every sample of a batch.

    ``method="exact"`` builds J and takes its SVD; ``"subspace"`` runs the block Krylov estimator
    (warm-started from ``init`` if given); ``"auto"`` (default) is exact when ``k >= min(d, m)`` and the
    estimator otherwise (:func:`invdefend.spectral.use_exact`). ``tail=True`` adds a Lanczos quadrature rule
    for the rest. With a data ``prior`` it is the spectrum of the prior-whitened Jacobian (its InvLoss is
    the pixel error under that prior; :mod:`invdefend.risk`). For token ids pass ``embedding_module`` (the
    Jacobian is then taken with respect to its output; :func:`~invdefend.jacobian.gradient_jacobian`).
    ``left=False`` skips the left singular vectors; ``block="auto"`` sweeps 8 columns at a time on models too
    large to keep the sweeps' images (:func:`~invdefend.spectral.topk_spectrum`). ``params``: the spectrum of
    the gradient of those parameters only (a layer subset; alone it under-states the risk, THEORY §10.6).
    """
    op = gradient_jacobian(model, loss_fn, inputs, targets, mode=mode, embedding_module=embedding_module,
                           params=params)
    return estimate_spectrum(
        op, k, method=method, tail=tail, init=init, max_sweeps=max_sweeps, tol=tol, oversample=oversample,
        slq_probes=slq_probes, slq_steps=slq_steps, generator=generator, prior=prior, left=left,
        block=block,
    )


def estimate_embedding_spectrum(
    bottom: nn.Module,
    inputs: Tensor,
    *,
    k: int = 16,
    method: Method = "auto",
    tail: bool = False,
    init: Spectrum | Tensor | None = None,
    max_sweeps: int = 12,
    tol: float = 1e-2,
    oversample: int = 16,
    slq_probes: int = 4,
    slq_steps: int = 24,
    mode: Literal["eval", "train"] = "eval",
    generator: torch.Generator | None = None,
    prior: GaussianPrior | None = None,
    left: bool = True,
    block: int | Literal["auto"] | None = "auto",
) -> Spectrum:
    """Top-k spectrum of ``∂(cut-layer embedding)/∂input`` for every sample of a batch (of the
    prior-whitened Jacobian with a data ``prior``)."""
    op = embedding_jacobian(bottom, inputs, mode=mode)
    return estimate_spectrum(
        op, k, method=method, tail=tail, init=init, max_sweeps=max_sweeps, tol=tol, oversample=oversample,
        slq_probes=slq_probes, slq_steps=slq_steps, generator=generator, prior=prior, left=left,
        block=block,
    )


@dataclass
class RiskReport:
    """InvRE's output: per-sample risk, aggregates and how it was estimated. JSON-serialisable."""

    predicted_psnr: list[float]
    leakage: list[float]
    invloss: list[float]
    singular_values: list[list[float]]
    settings: dict[str, Any]
    estimator: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def n_samples(self) -> int:
        """Number of samples assessed."""
        return len(self.invloss)

    @property
    def aggregates(self) -> dict[str, dict[str, float]]:
        """Mean, p95, max (and min) of predicted PSNR, leakage and InvLoss."""
        return {
            "predicted_psnr": summarise(self.predicted_psnr),
            "leakage": summarise(self.leakage),
            "invloss": summarise(self.invloss),
        }

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists and floats) with the aggregates included."""
        out = asdict(self)
        out["n_samples"] = self.n_samples
        out["aggregates"] = self.aggregates
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RiskReport":
        """Rebuild a report from :meth:`to_dict` output."""
        keys = ("predicted_psnr", "leakage", "invloss", "singular_values", "settings", "estimator", "name")
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def merge(cls, reports: list["RiskReport"], name: str = "") -> "RiskReport":
        """Concatenate reports of the same settings (e.g. the batches of a loader)."""
        if not reports:
            raise ValueError("invdefend.RiskReport.merge: no reports to merge")
        est = dict(reports[0].estimator)
        est["sweeps_max"] = max(r.estimator.get("sweeps_max", 0) for r in reports)
        est["converged_fraction"] = float(
            np.average([r.estimator.get("converged_fraction", 1.0) for r in reports], weights=[r.n_samples for r in reports])
        )
        est["seconds"] = float(sum(r.estimator.get("seconds", 0.0) for r in reports))
        settings = reports[0].settings
        if "rest_bound" in settings:  # per sample, like the risk: every chunk's
            settings = {**settings, "rest_bound": [b for r in reports for b in r.settings["rest_bound"]]}
        return cls(
            predicted_psnr=sum((r.predicted_psnr for r in reports), []),
            leakage=sum((r.leakage for r in reports), []),
            invloss=sum((r.invloss for r in reports), []),
            singular_values=sum((r.singular_values for r in reports), []),
            settings=settings,
            estimator=est,
            name=name or reports[0].name,
        )

    def table(self) -> str:
        """A small text table of the aggregates."""
        return format_comparison({self.name or "model": self})


def format_comparison(reports: Mapping[str, RiskReport]) -> str:
    """A text table comparing reports (architectures, checkpoints) on the same data."""
    header = f"{'name':<24} {'n':>5} {'PSNR mean':>10} {'PSNR p95':>9} {'PSNR max':>9} {'leak mean':>10} {'leak max':>9} {'tail':>6}"
    rows = [header, "-" * len(header)]
    for name, rep in reports.items():
        a = rep.aggregates
        rows.append(
            f"{name[:24]:<24} {rep.n_samples:>5d} {a['predicted_psnr']['mean']:>10.2f} {a['predicted_psnr']['p95']:>9.2f} "
            f"{a['predicted_psnr']['max']:>9.2f} {a['leakage']['mean']:>10.4f} {a['leakage']['max']:>9.4f} "
            f"{rep.estimator.get('tail', '?'):>6}"
        )
    return "\n".join(rows)


class InvRE:
    """Attack-agnostic reconstruction-risk estimator.

    Args:
        model: the model whose training signal is shared (``target="gradient"``), or the client's bottom
            model up to the cut layer (``target="embedding"``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (gradient target only).
        target: ``"gradient"`` or ``"embedding"``.
        k: singular triplets estimated per sample.
        method: ``"auto"`` (default: exact when ``k >= min(d, m)``, else block Krylov), ``"subspace"`` (block
            Krylov) or ``"exact"`` (build J; small models only).
        tail: ``"slq"`` (Lanczos quadrature for the unestimated spectrum, default) or ``"topk"``
            (conservative: unestimated directions at ``s_k``).
        noise: noise the release carries (default: none beyond the reference attacker precision ``rho``).
        rho: reference attacker precision (default :data:`invdefend.risk.DEFAULT_RHO`).
        prior: the attacker's data prior (THEORY §7). A :class:`~invdefend.prior.GaussianPrior` fitted on data
            the attacker could have (never the assessed samples); ``"iid"``: the i.i.d. prior ``v0·I``;
            ``"auto"`` (default): a data prior whenever the assessed data can fit one without seeing the
            sample it prices — the samples are split in two folds and each fold is priced under a prior
            (rank ``prior_rank``) fitted on the other fold, when each fold has at least
            :data:`MIN_PRIOR_SAMPLES` samples; otherwise the i.i.d. prior. The report's
            ``settings["prior"]`` says which was used.
        prior_rank: principal directions of a prior fitted by ``"auto"``.
        v0: prior variance per input coordinate of the i.i.d. prior (default ``dynamic_range²/12``).
        dynamic_range: ``R`` of the inputs (1 for images in [0, 1]).
        batch_size: samples estimated together (vmap batch).
        max_sweeps, tol, oversample: estimator settings (see :func:`invdefend.spectral.topk_spectrum`).
        slq_probes, slq_steps: quadrature settings.
        mode: evaluate the model in ``"eval"`` (default) or ``"train"`` mode.
        seed: seed of the estimator's random probes.
        progress: show a progress bar over batches.
        params: assess through a layer subset (gradient target only): the spectrum of the gradient of these
            parameters (names, module names or modules, :func:`~invdefend.jacobian.select_parameters`), with
            what the others can add bounded by ``‖J_R‖₂`` (:mod:`invdefend.subset`, THEORY §10.6): the
            reported risk is an upper bound on the whole gradient's. The report's settings add ``params``,
            ``rest_bound`` (the upper estimate of ``‖J_R‖₂`` per sample) and ``rest_rule``.
        rest_steps, rest_failure: Lanczos steps of the rest's norm and the probability per sample that its
            estimate falls short (:func:`~invdefend.subset.rest_norm`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        target: Target = "gradient",
        k: int = 16,
        method: Method = "auto",
        tail: Literal["slq", "topk"] = "slq",
        noise: NoiseModel | None = None,
        rho: float = DEFAULT_RHO,
        prior: PriorChoice = "auto",
        prior_rank: int = DEFAULT_RANK,
        v0: float | None = None,
        dynamic_range: float = 1.0,
        batch_size: int = 8,
        max_sweeps: int = 12,
        tol: float = 1e-2,
        oversample: int = 16,
        slq_probes: int = 4,
        slq_steps: int = 24,
        mode: Literal["eval", "train"] = "eval",
        seed: int = 0,
        progress: bool = False,
        params: ParamSpec | None = None,
        rest_steps: int = DEFAULT_STEPS,
        rest_failure: float = DEFAULT_FAILURE,
    ) -> None:
        if target not in ("gradient", "embedding"):
            raise ValueError(f"invdefend.InvRE: target={target!r}; choose 'gradient' or 'embedding'")
        if target == "gradient" and loss_fn is None:
            raise ValueError("invdefend.InvRE: target='gradient' needs loss_fn(outputs, targets)")
        if tail not in ("slq", "topk"):
            raise ValueError(f"invdefend.InvRE: tail={tail!r}; choose 'slq' or 'topk'")
        if k < 1 or batch_size < 1:
            raise ValueError(f"invdefend.InvRE: k={k} and batch_size={batch_size} must be >= 1")
        self.model = model
        self.loss_fn = loss_fn
        self.target = target
        self.k = k
        self.method = method
        self.tail = tail
        self.noise = noise if noise is not None else NoiseModel(rho=rho)
        if noise is not None and rho != DEFAULT_RHO and noise.rho != rho:
            raise ValueError("invdefend.InvRE: rho given twice (as rho= and in noise=) with different values")
        if not isinstance(prior, GaussianPrior) and prior not in ("auto", "iid"):
            raise ValueError(
                f"invdefend.InvRE: prior={prior!r}; pass a GaussianPrior (e.g. GaussianPrior.fit(calibration_inputs)), "
                "'auto' or 'iid'"
            )
        self.prior = prior
        self.prior_rank = int(prior_rank)
        self.dynamic_range = dynamic_range
        self.v0 = default_prior_variance(dynamic_range) if v0 is None else float(v0)
        self.batch_size = batch_size
        self.max_sweeps, self.tol, self.oversample = max_sweeps, tol, oversample
        self.slq_probes, self.slq_steps = slq_probes, slq_steps
        self.mode = mode
        self.seed = seed
        self.progress = progress
        self.params = self._check_params(params)
        if rest_steps < 2 or not 0 < rest_failure < 1:
            raise ValueError(f"invdefend.InvRE: rest_steps={rest_steps} must be >= 2 and rest_failure={rest_failure} "
                             "in (0, 1)")
        self.rest_steps, self.rest_failure = int(rest_steps), float(rest_failure)

    def _check_params(self, params: ParamSpec | None) -> list[str] | None:
        """The layer subset as names (modules by their qualified names), checked against the model."""
        if params is None:
            return None
        if self.target != "gradient":
            raise ValueError("invdefend.InvRE: params= chooses parameters of the shared gradient; an embedding "
                             "has none (drop params, or assess target='gradient')")
        items = [params] if isinstance(params, (str, nn.Module)) else list(params)
        select_parameters(self.model, items, where="InvRE")
        names = {m: n for n, m in self.model.named_modules()}
        return [item if isinstance(item, str) else names[item] for item in items]

    def spectrum(
        self, inputs: Tensor, targets: Tensor | None = None, *, init: Spectrum | None = None,
        prior: GaussianPrior | None = None, left: bool = True,
    ) -> Spectrum:
        """The per-sample spectrum of one batch (of the prior-whitened Jacobian when ``prior`` is given, or
        when this InvRE holds a fitted prior); ``left=False`` skips the left singular vectors (the report
        does not use them; on a large model they cost a product and ``m × k`` memory per sample)."""
        if prior is None and isinstance(self.prior, GaussianPrior):
            prior = self.prior
        gen = torch.Generator(device=inputs.device).manual_seed(self.seed)
        common = dict(
            k=self.k, method=self.method, tail=self.tail == "slq", init=init, max_sweeps=self.max_sweeps,
            tol=self.tol, oversample=self.oversample, slq_probes=self.slq_probes, slq_steps=self.slq_steps,
            mode=self.mode, generator=gen, prior=prior, left=left,
        )
        if self.target == "gradient":
            if targets is None:
                raise ValueError("invdefend.InvRE: target='gradient' needs the batch's targets (labels)")
            assert self.loss_fn is not None
            return estimate_gradient_spectrum(self.model, self.loss_fn, inputs, targets, params=self.params,
                                              **common)
        return estimate_embedding_spectrum(self.model, inputs, **common)

    def rest_bound(self, inputs: Tensor, targets: Tensor | None, *, prior: GaussianPrior | None = None) -> RestBound:
        """The bound on what the parameters outside ``params`` add, for one batch
        (:func:`~invdefend.subset.rest_norm`; in the whitened coordinates of ``prior`` when given)."""
        if self.params is None:
            raise ValueError("invdefend.InvRE.rest_bound: no layer subset (params=) was chosen")
        if targets is None:
            raise ValueError("invdefend.InvRE: target='gradient' needs the batch's targets (labels)")
        assert self.loss_fn is not None
        gen = torch.Generator(device=inputs.device).manual_seed(self.seed + 1)
        return rest_norm(self.model, self.loss_fn, inputs, targets, self.params, steps=self.rest_steps,
                         failure=self.rest_failure, mode=self.mode, prior=prior, generator=gen)

    def _report_from(
        self, spec: Spectrum, seconds: float, name: str, prior_used: str, rest: RestBound | None = None
    ) -> RiskReport:
        if rest is None:
            risk = RiskEstimate.from_spectrum(
                spec, self.noise, v0=self.v0, dynamic_range=self.dynamic_range, tail=self.tail
            )
        else:
            risk = bounded_risk(spec, rest, self.noise, v0=self.v0, dynamic_range=self.dynamic_range, tail=self.tail)
        v0 = self.v0 if spec.prior_trace is None else spec.prior_trace / spec.in_dim
        settings = {
            "target": self.target, "k": self.k, "method": self.method, "tail": self.tail,
            "rho": self.noise.rho, "v0": v0, "dynamic_range": self.dynamic_range, "mode": self.mode,
            "in_dim": spec.in_dim, "out_dim": spec.out_dim, "prior": prior_used,
        }
        if rest is not None:
            settings.update({
                "params": self.params, "out_dim": spec.out_dim + rest.out_dim, "subset_out_dim": spec.out_dim,
                "rest_bound": rest.norm.double().tolist(),
                "rest_rule": {"steps": rest.steps, "failure": rest.failure, "factor": rest.factor},
            })
        estimator = {
            "sweeps_max": spec.sweeps,
            "converged_fraction": float(spec.converged.float().mean()),
            "max_residual": float(spec.residuals.max()) if spec.residuals is not None else 0.0,
            "tail": risk.tail,
            "seconds": seconds,
        }
        return RiskReport(
            predicted_psnr=risk.predicted_psnr.tolist(),
            leakage=risk.leakage.tolist(),
            invloss=risk.invloss.double().tolist(),
            singular_values=spec.singular_values[:, : self.k].double().tolist(),
            settings=settings,
            estimator=estimator,
            name=name,
        )

    def assess(self, inputs: Tensor, targets: Tensor | None = None, *, name: str = "") -> RiskReport:
        """Risk of every sample of a batch (split internally into ``batch_size`` chunks)."""
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise ValueError(
                f"invdefend.InvRE.assess: inputs must be a non-empty batch (B, ...), got shape {tuple(inputs.shape)}"
            )
        chunks = []
        folds = self.priors_for(inputs)
        starts = range(0, inputs.shape[0], self.batch_size)
        for start in self._progress(starts, total=len(starts)):
            sl = slice(start, start + self.batch_size)
            prior, used = folds(start)
            t0 = time.perf_counter()
            batch_targets = None if targets is None else targets[sl]
            spec = self.spectrum(inputs[sl], batch_targets, prior=prior, left=False)
            rest = None if self.params is None else self.rest_bound(inputs[sl], batch_targets, prior=prior)
            chunks.append(self._report_from(spec, time.perf_counter() - t0, name, used, rest))
        return RiskReport.merge(chunks, name=name)

    def priors_for(self, inputs: Tensor) -> Callable[[int], tuple[GaussianPrior | None, str]]:
        """Which prior prices the chunk starting at each sample index: ``start -> (prior or None, label)``.

        A given prior prices everything; ``"iid"`` nothing; ``"auto"`` cross-fits two folds split at a
        chunk boundary (each fold priced under a prior fitted on the other) when both folds have at least
        :data:`MIN_PRIOR_SAMPLES` samples, else falls back to the i.i.d. prior.
        """
        if isinstance(self.prior, GaussianPrior):
            return lambda start: (self.prior, "given")  # type: ignore[return-value]
        n = inputs.shape[0]
        half = (n // 2 // self.batch_size) * self.batch_size
        if self.prior == "iid" or min(half, n - half) < MIN_PRIOR_SAMPLES:
            return lambda start: (None, "iid")
        rank = max(0, min(self.prior_rank, min(half, n - half) - 1))
        flat = inputs.detach()
        first = GaussianPrior.fit(flat[half:], rank)  # prices the first fold
        second = GaussianPrior.fit(flat[:half], rank)  # prices the second fold
        return lambda start: (first, "cross-fitted") if start < half else (second, "cross-fitted")

    def assess_loader(self, loader: Iterable, *, max_samples: int | None = None, name: str = "") -> RiskReport:
        """Risk of the samples of a data loader yielding ``(inputs, targets)`` or ``inputs`` batches.

        The samples (at most ``max_samples``) are gathered first, so that ``prior="auto"`` can price each
        fold under a prior fitted on the other."""
        xs: list[Tensor] = []
        ys: list[Tensor | None] = []
        seen = 0
        for batch in self._progress(loader, total=None):
            inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            if max_samples is not None:
                inputs = inputs[: max_samples - seen]
                targets = None if targets is None else targets[: max_samples - seen]
            if inputs.shape[0] == 0:
                break
            xs.append(inputs)
            ys.append(targets)
            seen += inputs.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
        if not xs:
            raise ValueError("invdefend.InvRE.assess_loader: the loader yielded no samples")
        if any(y is None for y in ys) and not all(y is None for y in ys):
            raise ValueError("invdefend.InvRE.assess_loader: some batches have targets and some do not")
        targets_all = None if ys[0] is None else torch.cat(ys)  # type: ignore[arg-type]
        # all samples at once, so that prior="auto" can fit the prior of each fold on the other fold
        return self.assess(torch.cat(xs), targets_all, name=name)

    def compare(
        self,
        models: Mapping[str, nn.Module],
        inputs: Tensor,
        targets: Tensor | None = None,
    ) -> dict[str, RiskReport]:
        """Assess several models or checkpoints (same settings, same data); returns reports by name.

        Print :func:`format_comparison` of the result for a table.
        """
        out: dict[str, RiskReport] = {}
        original = self.model
        try:
            for name, model in models.items():
                self.model = model
                out[name] = self.assess(inputs, targets, name=name)
        finally:
            self.model = original
        return out

    def _progress(self, it: Iterable, total: int | None) -> Iterable:
        if not self.progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc="invdefend.InvRE", unit="batch")
