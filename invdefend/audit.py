"""Audit a release with real attacks: what InvRE predicts against what the attacks recover.

:func:`audit` runs chosen gradient attacks (DLG, Inverting Gradients, iDLG, and the defense-aware MAP
attack when a defense adds noise) on samples of a model's shared gradient (batch of one, the federated
worst case), without and with a defense, and returns a JSON-able :class:`AuditReport` holding, per sample,
InvRE's predicted PSNR (with the defense's noise model where a defense is on), every attack's PSNR and
SSIM, and the strongest attack. :func:`save_audit` writes ``audit.json``, ``grid.png`` (originals vs
reconstructions) and ``scatter.png`` (predicted vs attacked PSNR). :func:`quick_audit` is the short
version the demo calls.

The rank statistics are in :mod:`invdefend.stats` (:func:`spearman` and :func:`pearson` are re-exported
here for compatibility); the fidelity study's calibration helpers are in :mod:`invdefend.fidelity`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from . import attacks
from .attacks import model_gradient
from .defense import GradientDefense
from .jacobian import gradient_jacobian
from .metrics import PSNR_CAP_DB, psnr, ssim
from .noise_law import BandPassLaw, NoiseCovariance
from .prior import GaussianPrior
from .risk import DEFAULT_RHO, NoiseModel, invloss, predicted_psnr
from .spectral import exact_spectrum
from .stats import pearson, spearman  # re-exported for compatibility; they live in invdefend.stats

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "SELECT_BY",
    "MIN_CLASS_SAMPLES",
    "fit_attacker_priors",
    "SampleAudit",
    "AuditReport",
    "released_gradient",
    "audit",
    "quick_audit",
    "format_summary",
    "save_audit",
    "plot_grid",
    "image_array",
    "plot_scatter",
    "spearman",
    "pearson",
]

#: Attacks :func:`audit` knows, by the name ``--attacks`` uses. ``"prior"`` and ``"class_prior"`` are the
#: defense-aware MAP attack with a fitted Gaussian image prior (:class:`~invdefend.prior.GaussianPrior`): one
#: prior for every sample, or one per label (the attacker reads the label off the gradient, iDLG); like
#: ``"aware"`` they run only where a defense adds noise.
ATTACKS: tuple[str, ...] = ("dlg", "ig", "idlg", "aware", "prior", "class_prior")
#: Calibration samples a label needs for its own prior (``class_prior``); fewer: the data prior stands in.
MIN_CLASS_SAMPLES: int = 16
#: What picks a sample's strongest attack: the highest PSNR, or the highest SSIM.
SELECT_BY: tuple[str, ...] = ("psnr", "ssim")
#: Defenses :func:`audit` can put on the release.
DEFENSES: tuple[str, ...] = ("none", "spectral", "isotropic", "band_pass")


# --------------------------------------------------------------------------------------------------------
# the audit


@dataclass
class SampleAudit:
    """One attacked sample: InvRE's prediction, every attack's PSNR / SSIM, and the strongest attack."""

    index: int
    label: int
    defense: str
    predicted_psnr: float
    attacked_psnr: dict[str, float]
    ssim: dict[str, float]
    best_attack: str
    best_psnr: float
    relative_noise_energy: float = 0.0


@dataclass
class AuditReport:
    """Every sample's :class:`SampleAudit` per defense, the settings, and the reconstructions (not in JSON)."""

    samples: list[SampleAudit]
    settings: dict[str, Any]
    originals: Tensor | None = field(default=None, repr=False)
    reconstructions: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per defense: mean predicted PSNR, mean best attacked PSNR, mean SSIM of the strongest attack."""
        out: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(s.defense for s in self.samples):
            rows = [s for s in self.samples if s.defense == name]
            out[name] = {
                "n": len(rows),
                "predicted_psnr_mean": sum(r.predicted_psnr for r in rows) / len(rows),
                "attacked_psnr_mean": sum(r.best_psnr for r in rows) / len(rows),
                "attacked_psnr_max": max(r.best_psnr for r in rows),
                "best_ssim_mean": sum(r.ssim[r.best_attack] for r in rows) / len(rows),
                "relative_noise_energy_mean": sum(r.relative_noise_energy for r in rows) / len(rows),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: settings, summary, samples."""
        return {"settings": self.settings, "summary": self.summary(), "samples": [asdict(s) for s in self.samples]}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (non-finite numbers written as null)."""
        return json.dumps(_finite(self.to_dict()), indent=indent)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def released_gradient(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    defense: str = "none",
    budget: float = 0.05,
    seed: int = 0,
    k: int = 8,
    floor: float | None = None,
) -> tuple[Tensor, float, Any, float]:
    """The flat gradient one client shares for the batch ``(x, y)``, with a defense's noise when one is on.

    The defended release is made by :class:`~invdefend.defense.GradientDefense` exactly as in training
    (``capture``, backward, ``protect``), on a copy of ``model`` so the caller's gradients are untouched.
    ``floor`` (isotropic energy relative to ``‖g‖²``, >= 0) is passed to every noisy defense; 0 disables it,
    ``None`` keeps the defense's default (half of ``budget`` for ``"spectral"``, none otherwise).
    The attacker's noise covariance is the defense's public law (:meth:`GradientDefense.noise_law`).

    ``defense="band_pass"`` (``GradientDefense(mechanism="band_pass", budget=budget, floor=floor, probes=1)``)
    is audited against the law it approximates, :meth:`~invdefend.noise_law.BandPassLaw.covariance` on the
    *exact* SVD of the sample's gradient Jacobian (float64) with the ``μ`` the draw used. It is the Gaussian
    law the mechanism approximates, not its exact law (the draw comes from a Lanczos approximation and its
    norm is fixed). The predicted PSNR is InvRE (:func:`invdefend.risk.invloss`, default ``ρ``) under that
    same covariance on the same exact spectrum, *not* the defense's recorded prediction, which is
    deliberately conservative (``"floor_only"``). The exact SVD makes this audit cost grow with ``d·m``:
    fine for digits and 16x16/32x32 patches, not for full-size images.

    Returns:
        ``(gradient (m,), predicted_psnr, noise_covariance or None, relative_noise_energy)``: InvRE's
        predicted PSNR of the first sample of this release (with the defense's noise model), the
        :class:`~invdefend.noise_law.NoiseCovariance` a defense-aware attacker would know, and the noise
        energy relative to ``‖g‖²``.
    """
    if defense not in DEFENSES:
        raise ValueError(f"invdefend.audit: defense={defense!r}; choose one of {', '.join(DEFENSES)}")
    _check_floor(floor)
    clean = model_gradient(model, x, y, loss_fn)
    twin = copy.deepcopy(model)
    mechanism = "monitor" if defense == "none" else defense
    guard = GradientDefense(
        twin, loss_fn, budget=budget, mechanism=mechanism, floor=0.0 if defense == "none" else floor, k=k,
        probes=1, refresh_every=1, cold_sweeps=12, seed=seed, capture=False,
    )
    try:
        guard.capture(x, y)
        twin.zero_grad()
        twin.eval()
        loss_fn(twin(x), y).backward()
        record = guard.protect()
        params = [p for p in twin.parameters() if p.requires_grad]
        released = torch.cat([p.grad.reshape(-1) for p in params]).detach()
        energy = float(clean.pow(2).sum())
        law = None if defense == "none" else guard.noise_law()
        if isinstance(law, BandPassLaw):
            predicted, cov = _band_pass_prediction(model, loss_fn, x, y, law, energy)
        else:
            if defense == "band_pass":
                raise RuntimeError(
                    f"invdefend.audit: the band-pass draw failed ({record.fallback_reason}); the release was made "
                    "with fallback noise and cannot be audited as band_pass"
                )
            cov = law
            predicted = float(record.predicted_psnr[0]) if record.predicted_psnr else float("nan")
            if defense == "none" or not record.predicted_psnr:
                predicted = (float(record.undefended_predicted_psnr[0]) if record.undefended_predicted_psnr
                             else predicted)
        rel = float((released - clean).pow(2).sum() / max(energy, 1e-30))
    finally:
        guard.detach()
    return released, predicted, cov, rel


def _check_floor(floor: float | None) -> None:
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
        raise ValueError(f"invdefend.audit: floor={floor!r} must be finite and >= 0 (0 disables it)")


def _band_pass_prediction(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    law: BandPassLaw,
    energy: float,
) -> tuple[float, NoiseCovariance]:
    """InvRE's predicted PSNR and the attacker's covariance of a band-pass release of one sample, from the
    exact SVD of its gradient Jacobian and the release's :class:`~invdefend.noise_law.BandPassLaw`."""
    with torch.enable_grad():
        op = gradient_jacobian(model, loss_fn, x[:1], y[:1])
        # The complete spectrum in float64; τ_ref from the released sample's own gradient norm.
        spectrum = replace(exact_spectrum(op, dtype=torch.float64),
                           signal_norm=torch.tensor([math.sqrt(energy)], dtype=torch.float64))
    try:
        cov = law.covariance(spectrum)
    except ValueError as exc:
        raise RuntimeError(f"invdefend.audit: {exc}; nothing to audit as band_pass") from exc
    r = cov.tau.shape[-1]
    shaped = torch.zeros_like(spectrum.singular_values)
    shaped[0, :r] = cov.tau
    il = invloss(spectrum, NoiseModel(isotropic=cov.sigma2_iso, shaped=shaped, rho=DEFAULT_RHO))
    return float(predicted_psnr(il)[0]), cov


def _run_attack(
    name: str,
    model: nn.Module,
    g: Tensor,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    cov: Any,
    iterations: int,
    seed: int,
    prior: GaussianPrior | None = None,
    class_priors: Mapping[int, GaussianPrior] | None = None,
    restarts: int = 1,
) -> Tensor | None:
    shape = tuple(x.shape)
    if name == "dlg":
        return attacks.dlg(
            model, g, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations, seed=seed
        ).reconstruction
    if name == "ig":
        tv = 1e-4 if x.shape[-1] <= 16 else 1e-2
        return attacks.inverting_gradients(
            model, g, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations, tv_weight=tv, seed=seed,
            restarts=restarts,
        ).reconstruction
    if name == "idlg":
        return attacks.idlg_attack(
            model, g, input_shape=shape, loss_fn=loss_fn, iterations=iterations, seed=seed
        ).reconstruction
    if name == "aware":
        if cov is None:
            return None  # no noise: the defense-aware attack is DLG with a prior, nothing to add
        return attacks.defense_aware_gradient_attack(
            model, g, noise=cov, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations, seed=seed
        ).reconstruction
    if name in ("prior", "class_prior"):
        if cov is None:
            return None  # undefended: DLG / Inverting Gradients already match the exact gradient
        chosen = prior if name == "prior" else (class_priors or {}).get(int(y[0]))
        if chosen is None:
            raise ValueError(
                f"invdefend.audit: attack {name!r} needs "
                + ("prior=" if name == "prior" else f"class_priors= holding label {int(y[0])}")
                + " (a GaussianPrior fitted on auxiliary data, never the audited samples)"
            )
        return attacks.defense_aware_gradient_attack(
            model, g, noise=cov, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations,
            prior=chosen, seed=seed,
        ).reconstruction
    raise ValueError(f"invdefend.audit: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


def fit_attacker_priors(
    calibration: Tensor, labels: Tensor | None, audited_labels: Tensor
) -> tuple[GaussianPrior, dict[int, GaussianPrior]]:
    """The prior attacks' image priors, fitted on ``calibration`` (never the audited samples): one over all of
    it, and one per audited label from that label's calibration samples (the data prior stands in, with a
    notice, for a label with fewer than :data:`MIN_CLASS_SAMPLES`, or when the data has no labels)."""
    prior = GaussianPrior.fit(calibration.double())
    per_label: dict[int, GaussianPrior] = {}
    for label in sorted({int(v) for v in audited_labels}):
        own = calibration[labels == label] if labels is not None else calibration[:0]
        if len(own) >= MIN_CLASS_SAMPLES:
            per_label[label] = GaussianPrior.fit(own.double())
        else:
            per_label[label] = prior
            print(f"invdefend audit: label {label} has {len(own)} calibration samples (< {MIN_CLASS_SAMPLES}); "
                  "class_prior uses the data prior for it")
    return prior, per_label


def audit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    attacks: Sequence[str] = ("dlg", "ig"),
    defenses: Sequence[str] = ("none", "spectral"),
    budget: float = 0.05,
    iterations: int = 200,
    cap_db: float = PSNR_CAP_DB,
    seed: int = 0,
    k: int = 8,
    floor: float | None = None,
    progress: Callable[[str], None] | None = None,
    prior: GaussianPrior | None = None,
    class_priors: Mapping[int, GaussianPrior] | None = None,
    select_by: str = "psnr",
    restarts: int = 1,
) -> AuditReport:
    """Attack every sample's shared gradient (batch of one) under each defense and compare with InvRE.

    Args:
        model: the model whose gradient is shared (not modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        inputs, targets: the samples ``(N, ...)`` and their labels ``(N,)``; inputs in [0, 1].
        attacks: names from :data:`ATTACKS` (``"aware"`` runs only where a defense adds noise).
        defenses: names from :data:`DEFENSES`; ``"none"`` is the undefended baseline.
        budget: the defense's noise budget (energy relative to ``‖g‖²``).
        floor: isotropic noise energy (relative to ``‖g‖²``) every noisy defense adds on top of ``budget``
            (0: none; ``None``, the default: each defense's default, half of ``budget`` for ``"spectral"``);
            recommended with ``"band_pass"``, e.g. ``budget=0.075, floor=0.025``. For
            ``"band_pass"`` the prediction and the aware attacker's covariance are those of
            :func:`released_gradient` (the Gaussian law the mechanism approximates, from the exact SVD).
        iterations: iterations of every attack.
        cap_db: PSNRs are capped here (perfect recovery), so averages stay finite.
        seed: seed of the attacks' random starts and of the defense's noise.
        k: singular triplets the defense estimates.
        progress: called with a line of text after every attacked sample.
        prior, class_priors: the image prior of the ``"prior"`` attack, and the per-label priors of the
            ``"class_prior"`` attack (fitted on auxiliary data, never on the audited samples).
        select_by: ``"psnr"`` (default) or ``"ssim"``: the metric that picks each sample's strongest attack
            (its ``best_attack``, ``best_psnr`` and kept reconstruction).
        restarts: random starts of Inverting Gradients (the best match is kept); >= 1.
    """

    if inputs.dim() < 2 or len(inputs) != len(targets):
        raise ValueError(
            f"invdefend.audit: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be batches of "
            "the same length"
        )
    bad = [a for a in attacks if a not in ATTACKS] + [d for d in defenses if d not in DEFENSES]
    if bad or not attacks or not defenses:
        raise ValueError(
            f"invdefend.audit: unknown or missing attacks/defenses {bad}; attacks from {ATTACKS}, "
            f"defenses from {DEFENSES}"
        )
    _check_floor(floor)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"invdefend.audit: restarts={restarts!r} must be an integer >= 1")
    if select_by not in SELECT_BY:
        raise ValueError(f"invdefend.audit: select_by={select_by!r}; choose one of {', '.join(SELECT_BY)}")
    t0 = time.perf_counter()
    samples: list[SampleAudit] = []
    recs: dict[str, list[Tensor]] = {}
    for d in defenses:
        for i in range(len(inputs)):
            x, y = inputs[i : i + 1], targets[i : i + 1]
            g, predicted, cov, rel = released_gradient(
                model, loss_fn, x, y, defense=d, budget=budget, seed=seed + i, k=k, floor=floor
            )
            scores: dict[str, float] = {}
            sims: dict[str, float] = {}
            kept: dict[str, Tensor] = {}
            for a in attacks:
                rec = _run_attack(a, model, g, x, y, loss_fn, cov, iterations, seed + i, prior, class_priors, restarts)
                if rec is None:
                    continue
                kept[a] = rec.to(x.dtype).clamp(0, 1)
                scores[a] = float(psnr(kept[a], x, max_db=cap_db)[0])
                sims[a] = float(ssim(kept[a], x)[0]) if x.dim() == 4 else float("nan")
            rank = sims if select_by == "ssim" else scores
            best = max(rank, key=lambda a: (rank[a] if math.isfinite(rank[a]) else -math.inf, scores[a]))
            best_rec = kept[best]
            samples.append(SampleAudit(i, int(y[0]), d, min(predicted, cap_db), scores, sims, best, scores[best], rel))
            recs.setdefault(d, []).append(best_rec[0])
            if progress is not None:
                progress(f"{d} sample {i}: predicted {min(predicted, cap_db):.1f} dB, {best} {scores[best]:.1f} dB "
                         f"({time.perf_counter() - t0:.0f} s)")
    settings = {
        "attacks": list(attacks), "defenses": list(defenses), "budget": budget, "floor": floor,
        "iterations": iterations, "select_by": select_by, "restarts": restarts,
        "cap_db": cap_db, "seed": seed, "n_samples": len(inputs), "input_shape": list(inputs.shape[1:]),
        "model": type(model).__name__, "seconds": round(time.perf_counter() - t0, 2),
    }
    return AuditReport(samples, settings, inputs.detach().clone(), {d: torch.stack(r) for d, r in recs.items()})


def quick_audit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    defenses: Sequence[str] = ("none", "spectral"),
    budget: float = 0.05,
    n: int = 2,
    iterations: int = 100,
    out_dir: str | Path | None = None,
    seed: int = 0,
    floor: float | None = None,
) -> dict[str, Any]:
    """A short audit of ``n`` samples (DLG + Inverting Gradients, + the defense-aware attack under noise).

    Meant for the demo: a few seconds per sample on 8x8 digits. Returns :meth:`AuditReport.to_dict`
    (plus ``"files"`` when ``out_dir`` is given, where ``audit.json``, ``grid.png`` and ``scatter.png`` go).
    ``budget`` and ``floor`` are passed to every noisy defense (see :func:`audit`).
    """
    report = audit(
        model, loss_fn, inputs[:n], targets[:n], attacks=("dlg", "ig", "aware"), defenses=defenses,
        budget=budget, iterations=iterations, seed=seed, floor=floor,
    )
    out = report.to_dict()
    if out_dir is not None:
        out["files"] = {k: str(v) for k, v in save_audit(report, out_dir).items()}
    return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A small text table of :meth:`AuditReport.summary` (or the ``"summary"`` of :func:`quick_audit`)."""
    lines = [f"{'defense':<12}{'n':>3}{'predicted PSNR':>16}{'attacked PSNR':>15}{'max':>7}{'SSIM':>7}{'noise':>8}"]
    for name, s in summary.items():
        lines.append(
            f"{name:<12}{int(s['n']):>3}{s['predicted_psnr_mean']:>16.1f}{s['attacked_psnr_mean']:>15.1f}"
            f"{s['attacked_psnr_max']:>7.1f}{s['best_ssim_mean']:>7.2f}{s['relative_noise_energy_mean']:>8.3f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# files


def image_array(t: Tensor) -> Any:
    """One image ``(C, H, W)`` or ``(H, W)`` as a numpy array matplotlib shows: ``(H, W)`` for one channel,
    ``(H, W, 3)`` for RGB, clamped to [0, 1]."""
    img = t.detach().float().clamp(0, 1).cpu()
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    img = img.numpy()
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def plot_grid(report: AuditReport, path: str | Path) -> Path:
    """PNG grid: originals in the first row, the strongest attack's reconstruction per defense below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.originals is None:
        raise ValueError("invdefend.audit.plot_grid: the report holds no images (it was loaded from JSON)")
    rows = ["original", *report.reconstructions]
    n = len(report.originals)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n + 1.2, 1.5 * len(rows)), squeeze=False)
    by = {(s.defense, s.index): s for s in report.samples}
    for r, name in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = report.originals[c] if name == "original" else report.reconstructions[name][c]
            ax.imshow(image_array(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if name != "original":
                s = by[(name, c)]
                ax.set_title(f"{s.best_psnr:.0f} dB", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("originals vs strongest reconstruction (PSNR)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scatter(report: AuditReport, path: str | Path | BinaryIO) -> Path | BinaryIO:
    """PNG scatter of InvRE's predicted PSNR against the strongest attack's PSNR, one colour per defense.

    ``path`` is a file path (returned as a :class:`~pathlib.Path`) or a writable binary buffer such as
    :class:`io.BytesIO` (the PNG is written into it and the buffer returned).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    values: list[float] = []
    for name in dict.fromkeys(s.defense for s in report.samples):
        rows = [s for s in report.samples if s.defense == name]
        px = [s.predicted_psnr for s in rows]
        py = [s.best_psnr for s in rows]
        values += px + py
        ax.scatter(px, py, label=name, s=18)
    finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite) - 2, max(finite) + 2
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
    cap = report.settings.get("cap_db")
    note = f", capped at {cap:g}" if isinstance(cap, (int, float)) else ""
    ax.set_xlabel(f"InvRE predicted PSNR (dB{note})")
    ax.set_ylabel(f"strongest attack PSNR (dB{note})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = path if hasattr(path, "write") else Path(path)
    fig.savefig(target, dpi=100, format=None if isinstance(target, Path) else "png")
    plt.close(fig)
    return target


def save_audit(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``audit.json``, ``grid.png`` and ``scatter.png`` into ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(report.to_json() + "\n")
    return {"json": out / "audit.json", "grid": plot_grid(report, out / "grid.png"),
            "scatter": plot_scatter(report, out / "scatter.png")}
