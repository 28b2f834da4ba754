"""Audit a release with real attacks: what InvRE predicts against what the attacks recover.

:func:`audit` runs chosen gradient attacks (DLG, Inverting Gradients, iDLG, and the defense-aware MAP
attack when a defense adds noise) on samples of a model's shared gradient (batch of one, the federated
worst case), without and with a defense, and returns a JSON-able :class:`AuditReport` holding, per sample,
InvRE's predicted PSNR (with the defense's noise model where a defense is on), every attack's PSNR and
SSIM, and the strongest attack. :func:`save_audit` writes ``audit.json``, ``grid.png`` (originals vs
reconstructions) and ``scatter.png`` (predicted vs attacked PSNR). :func:`quick_audit` is the short
version the demo calls.

The fidelity study's statistics live here too: :func:`spearman`, :func:`pearson`, the stratified
:func:`calibration_split` and :func:`calibrate_rho` (choose the attacker precision ``ρ`` on calibration
samples only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "SampleAudit",
    "AuditReport",
    "released_gradient",
    "audit",
    "quick_audit",
    "format_summary",
    "save_audit",
    "plot_grid",
    "plot_scatter",
    "spearman",
    "pearson",
    "calibration_split",
    "calibrate_rho",
    "RHO_GRID",
]

#: Attacks :func:`audit` knows, by the name ``--attacks`` uses.
ATTACKS: tuple[str, ...] = ("dlg", "ig", "idlg", "aware")
#: Defenses :func:`audit` can put on the release.
DEFENSES: tuple[str, ...] = ("none", "spectral", "isotropic", "band_pass")
#: The log grid of attacker precisions searched by :func:`calibrate_rho` (1e-5 … 1, 4 points per decade).
RHO_GRID: tuple[float, ...] = tuple(10.0 ** (e / 4) for e in range(-20, 1))


# --------------------------------------------------------------------------------------------------------
# statistics of the fidelity study


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (``nan`` when either is constant)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"invdefend.audit.pearson: need two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled)."""
    return pearson(_ranks(list(a)), _ranks(list(b)))


def calibration_split(
    group_sizes: Sequence[int], per_group: int, *, seed: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split samples, stratified by group (setting), into calibration and held-out ``(group, index)`` lists.

    ``per_group`` samples of every group, drawn with a seeded permutation, go to calibration; the rest are
    held out. The two lists are disjoint and together cover every sample.
    """
    if per_group < 1:
        raise ValueError(f"invdefend.audit.calibration_split: per_group={per_group} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    cal: list[tuple[int, int]] = []
    held: list[tuple[int, int]] = []
    for g, size in enumerate(group_sizes):
        if size <= per_group:
            raise ValueError(
                f"invdefend.audit.calibration_split: group {g} has {size} samples, not more than per_group="
                f"{per_group}; nothing would be held out"
            )
        perm = torch.randperm(size, generator=gen).tolist()
        cal += [(g, i) for i in sorted(perm[:per_group])]
        held += [(g, i) for i in sorted(perm[per_group:])]
    return cal, held


def calibrate_rho(
    evaluate: Callable[[float], tuple[Sequence[float], Sequence[float]]],
    *,
    grid: Sequence[float] = RHO_GRID,
    criterion: str = "mse",
) -> tuple[float, dict[float, float]]:
    """Choose the attacker precision ``ρ`` from ``grid`` on calibration samples.

    Args:
        evaluate: ``evaluate(rho) -> (predicted_psnr, attacked_psnr)`` of the *calibration* samples only.
        grid: candidate values of ``ρ``.
        criterion: ``"mse"`` (least mean squared dB error between prediction and attack) or ``"spearman"``
            (highest rank correlation; ties broken by the smaller squared error).

    Returns:
        The chosen ``ρ`` and the score of every grid point (mean squared error, or −Spearman).
    """
    if criterion not in ("mse", "spearman"):
        raise ValueError(f"invdefend.audit.calibrate_rho: criterion={criterion!r}; choose 'mse' or 'spearman'")
    if not grid:
        raise ValueError("invdefend.audit.calibrate_rho: empty grid")
    scores: dict[float, float] = {}
    keys: dict[float, tuple[float, float]] = {}
    for rho in grid:
        pred, att = evaluate(float(rho))
        err = sum((p - a) ** 2 for p, a in zip(pred, att)) / max(len(pred), 1)
        if criterion == "mse":
            scores[rho] = err
            keys[rho] = (err, 0.0)
        else:
            rs = spearman(pred, att)
            rs = -1.0 if math.isnan(rs) else rs
            scores[rho] = -rs
            keys[rho] = (-round(rs, 12), err)
    best = min(grid, key=lambda r: keys[r])
    return float(best), scores


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
    floor: float = 0.0,
) -> tuple[Tensor, float, Any, float]:
    """The flat gradient one client shares for the batch ``(x, y)``, with a defense's noise when one is on.

    The defended release is made by :class:`~invdefend.defense.GradientDefense` exactly as in training
    (``capture``, backward, ``protect``), on a copy of ``model`` so the caller's gradients are untouched.
    ``floor`` (isotropic energy relative to ``‖g‖²``, >= 0) is passed to every noisy defense; 0 disables it.

    ``defense="band_pass"`` (``GradientDefense(mechanism="band_pass", budget=budget, floor=floor, probes=1)``)
    is audited against the law it approximates, from the *exact* SVD ``J = U diag(s) Vᵀ`` of the sample's
    gradient Jacobian (float64; directions with ``s_i <= 1e-10·s_1`` dropped) and the ``μ`` the defense used
    (``record.extra["band_pass_mu"][0]``):

    * the :class:`~invdefend.attacks.NoiseCovariance` handed to the defense-aware attacker is
      ``Σ = (floor·‖g‖²/m)·I + U diag(τ) Uᵀ`` with ``τ_i = c·s_i²/(s_i² + μ)²`` and ``c`` such that
      ``Σ τ_i = budget·‖g‖²``. This is the Gaussian law the mechanism approximates, not its exact law: the
      released draw comes from a Lanczos approximation of ``J(JᵀJ + μ)⁻¹w`` (only approximately Gaussian
      with these variances) and is rescaled to energy exactly ``budget·‖g‖²`` (its norm is fixed);
    * the predicted PSNR is InvRE (:func:`invdefend.risk.invloss`, default ``ρ``) under that same
      covariance on the same exact, complete spectrum, *not* the defense's recorded prediction: the record
      is deliberately conservative (``"floor_only"``: it ignores the band-pass noise, so with ``floor=0``
      it equals the undefended prediction), which would make the audit compare the attacks with a
      prediction of a release that is not the one attacked.

    The exact SVD makes the band_pass audit cost grow with ``d·m`` (``d`` Jacobian products and an
    ``m × d`` SVD per sample): fine for digits and 16x16/32x32 patches, not for full-size images.

    Returns:
        ``(gradient (m,), predicted_psnr, noise_covariance or None, relative_noise_energy)``: InvRE's
        predicted PSNR of the first sample of this release (with the defense's noise model), the
        :class:`~invdefend.attacks.NoiseCovariance` a defense-aware attacker would know, and the noise
        energy relative to ``‖g‖²``.
    """
    import copy

    from .attacks import NoiseCovariance, model_gradient
    from .defense import GradientDefense

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
        cov = None
        energy = float(clean.pow(2).sum())
        # The allocation the defense just used (batch of one); GradientDefense has no public accessor for it.
        plan, spec = guard._plan, guard.spectrum
        if defense == "band_pass":
            mu = record.extra.get("band_pass_mu") if not record.fallback else None
            if not mu:
                raise RuntimeError(
                    f"invdefend.audit: the band-pass draw failed ({record.fallback_reason}); the release was made "
                    "with fallback noise and cannot be audited as band_pass"
                )
            predicted, cov = _band_pass_law(model, loss_fn, x, y, float(mu[0]), budget, floor, energy)
        elif defense != "none" and plan is not None:
            iso = plan.isotropic * energy
            if plan.shaped is not None and spec is not None and spec.left_vectors is not None:
                cov = NoiseCovariance(
                    sigma2_iso=iso, basis=spec.left_vectors[0].double(), tau=(plan.shaped[0] * energy).double()
                )
            else:
                cov = NoiseCovariance(sigma2_iso=iso)
        if defense != "band_pass":
            predicted = float(record.predicted_psnr[0]) if record.predicted_psnr else float("nan")
            if defense == "none" or not record.predicted_psnr:
                predicted = (float(record.undefended_predicted_psnr[0]) if record.undefended_predicted_psnr
                             else predicted)
        rel = float((released - clean).pow(2).sum() / max(energy, 1e-30))
    finally:
        guard.detach()
    return released, predicted, cov, rel


def _check_floor(floor: float) -> None:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
        raise ValueError(f"invdefend.audit: floor={floor!r} must be finite and >= 0 (0 disables it)")


def _band_pass_law(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mu: float,
    budget: float,
    floor: float,
    energy: float,
) -> tuple[float, Any]:
    """InvRE's predicted PSNR and the attacker's :class:`~invdefend.attacks.NoiseCovariance` of a band-pass
    release of one sample, from the exact SVD of its gradient Jacobian (see :func:`released_gradient`)."""
    from dataclasses import replace

    from .attacks import NoiseCovariance
    from .jacobian import gradient_jacobian
    from .mechanisms import placement_variances
    from .risk import DEFAULT_RHO, NoiseModel, invloss, predicted_psnr
    from .spectral import exact_spectrum

    with torch.enable_grad():
        op = gradient_jacobian(model, loss_fn, x[:1], y[:1])
        # The complete spectrum in float64; τ_ref from the released sample's own gradient norm.
        spectrum = replace(exact_spectrum(op, dtype=torch.float64),
                           signal_norm=torch.tensor([math.sqrt(energy)], dtype=torch.float64))
    S, U, m = spectrum.singular_values[0], spectrum.left_vectors[0], spectrum.out_dim
    keep = S > 1e-10 * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    r = int(keep.sum())
    if r == 0:
        raise RuntimeError("invdefend.audit: the sample's gradient Jacobian is zero; nothing to audit as band_pass")
    # Σ τ_i = budget·‖g‖²: the draw is rescaled to it; dropped directions carry no band-pass noise.
    shaped = placement_variances(torch.where(keep, S, torch.zeros_like(S)).unsqueeze(0), budget * energy,
                                 "band_pass", mu=mu)
    iso = floor * energy / m
    cov = NoiseCovariance(sigma2_iso=iso, basis=U[:, :r].contiguous(), tau=shaped[0, :r])
    il = invloss(spectrum, NoiseModel(isotropic=iso, shaped=shaped, rho=DEFAULT_RHO))
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
) -> Tensor | None:
    from . import attacks

    shape = tuple(x.shape)
    if name == "dlg":
        return attacks.dlg(
            model, g, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations, seed=seed
        ).reconstruction
    if name == "ig":
        tv = 1e-4 if x.shape[-1] <= 16 else 1e-2
        return attacks.inverting_gradients(
            model, g, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations, tv_weight=tv, seed=seed
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
    raise ValueError(f"invdefend.audit: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


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
    cap_db: float = 60.0,
    seed: int = 0,
    k: int = 8,
    floor: float = 0.0,
    progress: Callable[[str], None] | None = None,
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
            (0: none); recommended with ``"band_pass"``, e.g. ``budget=0.075, floor=0.025``. For
            ``"band_pass"`` the prediction and the aware attacker's covariance are those of
            :func:`released_gradient` (the Gaussian law the mechanism approximates, from the exact SVD).
        iterations: iterations of every attack.
        cap_db: PSNRs are capped here (perfect recovery), so averages stay finite.
        seed: seed of the attacks' random starts and of the defense's noise.
        k: singular triplets the defense estimates.
        progress: called with a line of text after every attacked sample.
    """
    from .metrics import psnr, ssim

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
            best_rec: Tensor | None = None
            for a in attacks:
                rec = _run_attack(a, model, g, x, y, loss_fn, cov, iterations, seed + i)
                if rec is None:
                    continue
                rec = rec.to(x.dtype).clamp(0, 1)
                scores[a] = float(psnr(rec, x, max_db=cap_db)[0])
                sims[a] = float(ssim(rec, x)[0]) if x.dim() == 4 else float("nan")
                if best_rec is None or scores[a] >= max(scores.values()):
                    best_rec = rec
            best = max(scores, key=scores.get)
            samples.append(SampleAudit(i, int(y[0]), d, min(predicted, cap_db), scores, sims, best, scores[best], rel))
            assert best_rec is not None
            recs.setdefault(d, []).append(best_rec[0])
            if progress is not None:
                progress(f"{d} sample {i}: predicted {predicted:.1f} dB, {best} {scores[best]:.1f} dB "
                         f"({time.perf_counter() - t0:.0f} s)")
    settings = {
        "attacks": list(attacks), "defenses": list(defenses), "budget": budget, "floor": floor,
        "iterations": iterations,
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
    floor: float = 0.0,
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


def _image(t: Tensor) -> Any:
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
            ax.imshow(_image(img), cmap="gray", vmin=0, vmax=1)
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


def plot_scatter(report: AuditReport, path: str | Path) -> Path:
    """PNG scatter of InvRE's predicted PSNR against the strongest attack's PSNR, one colour per defense."""
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
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_audit(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``audit.json``, ``grid.png`` and ``scatter.png`` into ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(report.to_json() + "\n")
    return {"json": out / "audit.json", "grid": plot_grid(report, out / "grid.png"),
            "scatter": plot_scatter(report, out / "scatter.png")}
