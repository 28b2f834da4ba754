"""Render an :class:`~invdefend.audit.AuditReport` as one self-contained HTML file.

:func:`render_html_report` returns the HTML text, :func:`write_html_report` writes it. The page holds the
audit's settings and threat model in plain words, the originals and the strongest reconstruction per
defense (each labelled with its PSNR and SSIM), InvRE's predicted PSNR against the strongest attack's PSNR
with the coverage stated in words, a per-sample table (worst sample first) and, when a training history of
:class:`~invdefend.monitor.ReleaseRecord` is given, the predicted PSNR and the noise energy over the steps.

Every image is an inline ``data:image/png;base64`` URI drawn with matplotlib (Agg, into memory), the
styles are inline and there is no script, so the file renders offline. The page is a Jinja2 template,
``invdefend/templates/audit_report.html.j2``, rendered with autoescaping on.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure
from torch import Tensor

from ._version import __version__
from .audit import AuditReport, SampleAudit, image_array, plot_scatter
from .monitor import ReleaseRecord

__all__ = ["DEFAULT_MARGIN_DB", "render_html_report", "write_html_report"]

#: How far (dB) the strongest attack may exceed InvRE's prediction and still count as covered.
DEFAULT_MARGIN_DB = 3.0
TEMPLATE = "audit_report.html.j2"
DASH = "—"

#: Settings shown first, in this order, with their labels; any other key follows under its own name.
_SETTINGS: tuple[tuple[str, str], ...] = (
    ("model", "Model"),
    ("checkpoint", "Checkpoint"),
    ("data", "Data"),
    ("attacks", "Attacks"),
    ("defenses", "Defenses"),
    ("budget", "Noise budget (energy relative to ‖g‖²)"),
    ("floor", "Isotropic floor (energy relative to ‖g‖²)"),
    ("iterations", "Iterations per attack"),
    ("seed", "Seed"),
    ("n_samples", "Samples"),
    ("input_shape", "Input shape"),
    ("cap_db", "PSNR cap (dB)"),
    ("seconds", "Audit time (s)"),
)
_OPTIONAL_SETTINGS = {"checkpoint"}  # shown only when set


# --------------------------------------------------------------------------------------------------------
# public API


def render_html_report(
    report: AuditReport,
    *,
    history: Sequence[ReleaseRecord] | None = None,
    title: str | None = None,
    margin_db: float = DEFAULT_MARGIN_DB,
) -> str:
    """The audit report as one self-contained HTML page (images inline, no external resources).

    Args:
        report: an :class:`~invdefend.audit.AuditReport` straight from :func:`~invdefend.audit.audit`
            (one loaded from JSON holds no images and is refused).
        history: release records of a training run (e.g. ``RiskMonitor.history``); when given, the page
            plots the predicted PSNR and the relative noise energy against the step.
        title: the page title (default: "invdefend audit report: <model>").
        margin_db: a sample counts as covered when its strongest attack's PSNR is at most InvRE's
            predicted PSNR plus this margin (dB, finite and >= 0).

    Raises:
        ValueError: the report has no samples or no images, or ``margin_db`` is not finite and >= 0.
    """
    _check_report(report)
    _check_margin(margin_db)
    return _environment().get_template(TEMPLATE).render(_context(report, history, title, float(margin_db)))


def write_html_report(
    report: AuditReport,
    path: str | Path,
    *,
    history: Sequence[ReleaseRecord] | None = None,
    title: str | None = None,
    margin_db: float = DEFAULT_MARGIN_DB,
) -> Path:
    """Write :func:`render_html_report` to ``path`` (UTF-8; parent folders created) and return the path."""
    html = render_html_report(report, history=history, title=title, margin_db=margin_db)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------------
# checks and the template environment


def _check_report(report: AuditReport) -> None:
    if not report.samples:
        raise ValueError("invdefend.report: the report has no samples; nothing to render")
    if report.originals is None:
        raise ValueError(
            "invdefend.report: the report holds no images (it was loaded from JSON); render the AuditReport "
            "that invdefend.audit.audit returned"
        )
    missing = sorted({s.defense for s in report.samples} - set(report.reconstructions))
    if missing:
        raise ValueError(f"invdefend.report: the report holds no reconstructions for defense(s) {missing}")


def _check_margin(margin_db: float) -> None:
    if not _finite(margin_db) or margin_db < 0:
        raise ValueError(f"invdefend.report: margin_db={margin_db!r} must be a finite number >= 0 (dB)")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The Jinja2 environment: the package's templates, autoescaping on, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("invdefend", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    return env


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals (no minus sign on a zero); non-finite or missing numbers print as a dash."""
    if not _finite(value):
        return DASH
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _pct(value: Any) -> str:
    """A fraction as a whole percentage; non-finite or missing as a dash."""
    return f"{100 * value:.0f}%" if _finite(value) else DASH


# --------------------------------------------------------------------------------------------------------
# what the template shows


def _context(
    report: AuditReport, history: Sequence[ReleaseRecord] | None, title: str | None, margin_db: float
) -> dict[str, Any]:
    settings = report.settings
    attacks = _attack_names(report)
    return {
        "title": title or f"invdefend audit report: {settings.get('model', 'model')}",
        "version": __version__,
        "settings": _settings_rows(settings),
        "cap_db": settings.get("cap_db"),
        "attacks": attacks,
        "aware": bool({"aware", "prior", "class_prior"} & set(attacks)),
        "select_by": settings.get("select_by", "psnr"),
        "margin_db": margin_db,
        "coverage": _coverage(report.samples, margin_db),
        "summary": report.summary(),
        "grids": [_grid(report, d) for d in _defenses(report)],
        "scatter_uri": _scatter_uri(report),
        "rows": _sample_rows(report.samples, attacks, margin_db),
        "history": _history(history) if history else None,
    }


def _defenses(report: AuditReport) -> list[str]:
    return list(dict.fromkeys(s.defense for s in report.samples))


def _attack_names(report: AuditReport) -> list[str]:
    """The attacks in the settings' order, then any other attack a sample holds."""
    named = [a for a in report.settings.get("attacks", []) if isinstance(a, str)]
    seen = [a for s in report.samples for a in s.attacked_psnr]
    return list(dict.fromkeys([*named, *seen]))


def _setting_text(key: str, value: Any) -> str:
    if value is None:
        return "each defense's default" if key == "floor" else DASH
    if key == "input_shape" and isinstance(value, (list, tuple)):
        return " × ".join(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or DASH
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else DASH
    return str(value)


def _settings_rows(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` per setting: the known ones in a fixed order, then the rest by name."""
    rows = [(label, _setting_text(key, settings.get(key))) for key, label in _SETTINGS
            if key not in _OPTIONAL_SETTINGS or settings.get(key) is not None]
    known = {key for key, _ in _SETTINGS}
    rows += [(key, _setting_text(key, settings[key])) for key in sorted(settings) if key not in known]
    return rows


def _covered(sample: SampleAudit, margin_db: float) -> bool:
    """The strongest attack did not exceed InvRE's prediction + ``margin_db`` (no finite prediction: False)."""
    return _finite(sample.predicted_psnr) and _finite(sample.best_psnr) \
        and sample.best_psnr <= sample.predicted_psnr + margin_db


@dataclass(frozen=True)
class _Coverage:
    """Samples whose strongest attack stayed within the prediction + margin, of all samples (per group)."""

    name: str
    covered: int
    total: int

    @property
    def fraction(self) -> float:
        """``covered / total`` (NaN with no samples)."""
        return self.covered / self.total if self.total else float("nan")


def _coverage(samples: Sequence[SampleAudit], margin_db: float) -> dict[str, Any]:
    def count(name: str, rows: Sequence[SampleAudit]) -> _Coverage:
        return _Coverage(name, sum(_covered(s, margin_db) for s in rows), len(rows))

    names = dict.fromkeys(s.defense for s in samples)
    return {"all": count("all", samples),
            "per_defense": [count(d, [s for s in samples if s.defense == d]) for d in names]}


def _worst_first(samples: Sequence[SampleAudit]) -> list[SampleAudit]:
    """Highest attacked PSNR first; samples without a finite PSNR last; ties by defense, then index."""
    order = {d: i for i, d in enumerate(dict.fromkeys(s.defense for s in samples))}
    return sorted(samples, key=lambda s: (-s.best_psnr if _finite(s.best_psnr) else math.inf,
                                          order[s.defense], s.index))


def _sample_rows(samples: Sequence[SampleAudit], attacks: Sequence[str], margin_db: float) -> list[dict[str, Any]]:
    return [{
        "defense": s.defense, "index": s.index, "label": s.label, "predicted": s.predicted_psnr,
        "scores": [(s.attacked_psnr.get(a), s.ssim.get(a)) for a in attacks],
        "best_attack": s.best_attack, "best_psnr": s.best_psnr, "noise": s.relative_noise_energy,
        "beaten": not _covered(s, margin_db),
    } for s in _worst_first(samples)]


# --------------------------------------------------------------------------------------------------------
# images


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _png_uri(buf.getvalue())


def _tensor_uri(image: Tensor) -> str:
    """One image (C, H, W) or (H, W) in [0, 1] as a PNG at its own resolution (the page scales it up)."""
    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, image_array(image), cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return _png_uri(buf.getvalue())


def _grid(report: AuditReport, defense: str) -> dict[str, Any]:
    """One defense's cells: each sample's original and strongest reconstruction with its PSNR and SSIM."""
    assert report.originals is not None
    recs = report.reconstructions[defense]
    cells = [{
        "index": s.index, "label": s.label, "attack": s.best_attack, "psnr": s.best_psnr,
        "ssim": s.ssim.get(s.best_attack), "original": _tensor_uri(report.originals[s.index]),
        "reconstruction": _tensor_uri(recs[s.index]),
    } for s in report.samples if s.defense == defense]
    return {"defense": defense, "cells": cells}


def _scatter_uri(report: AuditReport) -> str:
    buf = io.BytesIO()
    plot_scatter(report, buf)
    return _png_uri(buf.getvalue())


def _finite_max(values: Sequence[float]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return max(finite) if finite else None


def _history(history: Sequence[ReleaseRecord]) -> dict[str, Any]:
    """The history plot and its numbers in words."""
    risk = [(r.step, _finite_max(r.predicted_psnr)) for r in history]
    risk = [(step, v) for step, v in risk if v is not None]
    energy = [r.relative_energy for r in history if _finite(r.relative_energy)]
    return {
        "uri": _figure_uri(_history_figure(history)),
        "records": len(history),
        "first_step": min(r.step for r in history),
        "last_step": max(r.step for r in history),
        "estimates": len(risk),
        "psnr_min": min((v for _, v in risk), default=None),
        "psnr_max": max((v for _, v in risk), default=None),
        "energy_mean": sum(energy) / len(energy) if energy else None,
    }


def _history_figure(history: Sequence[ReleaseRecord]) -> Figure:
    """Predicted PSNR (largest over the probes, where estimated) and relative noise energy against the step."""
    fig = Figure(figsize=(7.2, 3.2))
    ax = fig.add_subplot()
    for name, pick, style in (("predicted PSNR, defended", lambda r: r.predicted_psnr, "-"),
                              ("predicted PSNR, undefended", lambda r: r.undefended_predicted_psnr, ":")):
        points = [(r.step, _finite_max(pick(r))) for r in history]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), style, marker="o", ms=3, color="tab:blue", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("predicted PSNR (dB, max over probes)", color="tab:blue", fontsize=8)
    twin = ax.twinx()
    twin.plot([r.step for r in history], [r.relative_energy for r in history], color="tab:orange",
              lw=1.2, label="relative noise energy")
    twin.set_ylabel("noise energy / ‖g‖²", color="tab:orange", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles=handles, fontsize=7, loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig
