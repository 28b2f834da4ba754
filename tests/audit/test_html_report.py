"""invdefend.report: the self-contained HTML audit report, without a browser (see test_html_report_browser.py).

Most tests render a hand-made AuditReport (no attack runs); the CLI test runs a real, tiny audit.
"""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from invdefend.audit import AuditReport, SampleAudit, plot_scatter
from invdefend.cli import main
from invdefend.monitor import ReleaseRecord
from invdefend.report import render_html_report, write_html_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_PNG = "data:image/png;base64,"


class _Page(HTMLParser):
    """Collects every ``<img>`` src, every ``src``/``href`` value, and the per-sample table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[tuple[str, int, str]] = []  # (defense, index, row class) of table.samples

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "tr" and a.get("data-defense") is not None:
            self.rows.append((a["data-defense"] or "", int(a.get("data-index") or -1), a.get("class") or ""))


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def synthetic_report(model: str = "TinyNet") -> AuditReport:
    """Two samples under two defenses, one prediction not finite, one sample beating its prediction."""
    samples = [
        SampleAudit(0, 3, "none", 60.0, {"dlg": 60.0}, {"dlg": 1.0}, "dlg", 60.0, 0.0),
        SampleAudit(1, 7, "none", 58.0, {"dlg": 21.0}, {"dlg": 0.6}, "dlg", 21.0, 0.0),
        SampleAudit(0, 3, "spectral", 22.0, {"dlg": 17.0, "aware": 31.5}, {"dlg": 0.3, "aware": 0.9}, "aware", 31.5,
                    0.04),
        SampleAudit(1, 7, "spectral", float("nan"), {"dlg": 18.5, "aware": 12.0}, {"dlg": 0.2, "aware": float("nan")},
                    "dlg", 18.5, 0.05),
    ]
    settings = {"model": model, "data": "digits", "attacks": ["dlg", "aware"], "defenses": ["none", "spectral"],
                "budget": 0.05, "floor": None, "iterations": 10, "cap_db": 60.0, "seed": 0, "n_samples": 2,
                "input_shape": [1, 8, 8], "seconds": 1.25}
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 8, 8, generator=gen)
    recs = {d: torch.rand(2, 1, 8, 8, generator=gen) for d in ("none", "spectral")}
    return AuditReport(samples, settings, images, recs)


def synthetic_history(steps: int = 40) -> list[ReleaseRecord]:
    """A training run's records: risk estimated every 5th step, the noise energy drifting with the budget."""
    return [
        ReleaseRecord("gradient", s, "spectral", relative_energy=0.05 + 0.0005 * s, budget=0.05 + 0.0005 * s,
                      refreshed=s % 5 == 0, predicted_psnr=[24.0 - 0.05 * s, 22.0] if s % 5 == 0 else [],
                      undefended_predicted_psnr=[41.0 + 0.1 * s] if s % 5 == 0 else [])
        for s in range(steps)
    ]


def test_html_is_self_contained_and_every_image_is_an_inline_png() -> None:
    html = render_html_report(synthetic_report(), history=synthetic_history())
    page = _parse(html)
    assert 'src="http' not in html and "<script" not in html.lower() and "@import" not in html
    assert all(not link.startswith(("http:", "https:", "//")) for link in page.links)
    # 2 originals + 2 reconstructions per defense, the scatter, the history plot
    assert len(page.images) == 2 * 2 * 2 + 2
    for src in page.images:
        assert src.startswith(DATA_PNG)
        png = base64.b64decode(src[len(DATA_PNG):], validate=True)
        assert png[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_sample_table_is_sorted_worst_first_and_prints_non_finite_numbers_as_a_dash() -> None:
    report = synthetic_report()
    page = _parse(render_html_report(report))
    expected = sorted(report.samples, key=lambda s: -s.best_psnr)
    assert [(d, i) for d, i, _ in page.rows] == [(s.defense, s.index) for s in expected]
    assert [(d, i) for d, i, cls in page.rows if cls == "beaten"] == [("spectral", 0), ("spectral", 1)]
    html = render_html_report(report)
    assert not re.search(r">\s*[-+]?(nan|inf)\s*<", html, re.IGNORECASE)
    assert '<td class="num">—</td>' in html  # the NaN prediction and the aware attack not run without noise
    assert "Coverage: <strong>2 of 4 samples\n  (50%)" in html


def test_coverage_margin_is_a_keyword_and_must_be_finite() -> None:
    report = synthetic_report()
    covered_with_margin = render_html_report(report, margin_db=10.0)
    assert "Coverage: <strong>3 of 4 samples" in covered_with_margin  # 31.5 <= 22 + 10
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="margin_db"):
            render_html_report(report, margin_db=bad)


def test_template_escapes_a_malicious_model_name_and_title() -> None:
    evil = "<script>alert('x')</script>"
    html = render_html_report(synthetic_report(model=evil), title=f"audit {evil}")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_history_section_appears_only_when_history_is_given() -> None:
    report = synthetic_report()
    with_history = render_html_report(report, history=synthetic_history())
    without = render_html_report(report)
    assert "Risk over training" in with_history and "Risk over training" in without
    assert 'alt="predicted PSNR and relative noise energy' in with_history
    assert "40 releases, steps 0 to 39" in with_history and "not available" not in with_history
    assert 'alt="predicted PSNR and relative noise energy' not in without
    assert "Risk over training is not available" in without
    assert len(_parse(with_history).images) == len(_parse(without).images) + 1


def test_report_without_images_is_refused_with_the_reason() -> None:
    report = synthetic_report()
    loaded = AuditReport(report.samples, report.settings)  # what a report read back from audit.json holds
    with pytest.raises(ValueError, match="loaded from JSON"):
        render_html_report(loaded)
    with pytest.raises(ValueError, match="no samples"):
        render_html_report(AuditReport([], report.settings, report.originals, report.reconstructions))


def test_write_html_report_creates_folders_and_plot_scatter_writes_to_a_buffer(tmp_path: Path) -> None:
    report = synthetic_report()
    out = write_html_report(report, tmp_path / "a" / "b" / "report.html", title="tiny")
    assert out == tmp_path / "a" / "b" / "report.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    buf = io.BytesIO()
    assert plot_scatter(report, buf) is buf and buf.getvalue()[:8] == PNG_MAGIC
    assert plot_scatter(report, tmp_path / "scatter.png") == tmp_path / "scatter.png"


@pytest.mark.slow
def test_cli_audit_writes_the_html_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "tinymodel_html_cli.py"
    factory.write_text(
        "import torch\nfrom invdefend.models import LeNet\n"
        "def make():\n    torch.manual_seed(0)\n    return LeNet(in_channels=1, image_size=8, width=4)\n"
    )
    html = tmp_path / "reports" / "audit.html"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["audit", "--model", f"{factory}:make", "--data", "digits", "-n", "1", "--attacks", "dlg,aware",
                     "--defense", "spectral", "--iterations", "5", "--out", str(tmp_path / "out"),
                     "--html", str(html)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert str(html) in capsys.readouterr().out
    text = html.read_text(encoding="utf-8")
    page = _parse(text)
    assert {d for d, _, _ in page.rows} == {"none", "spectral"} and len(page.rows) == 2
    assert "Per-sample results" in text and "Risk over training is not available" in text
    assert f"{factory}:make" in text  # the settings name the model the CLI loaded
