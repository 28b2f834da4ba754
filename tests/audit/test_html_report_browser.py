"""The HTML audit report opened in a real headless browser: Debian's chromium and chromium-driver, driven by
Selenium with explicit binaries (Selenium Manager never downloads anything).

A real, tiny audit (2 digits, DLG + the defense-aware attack, undefended and spectral) is written with a
synthetic training history and loaded from ``file://``: every image must decode, the console must hold no
error, the sections and the worst sample must come first, and a full-page screenshot is saved (to pytest's
tmp path, and to ``$INVDEFEND_SCREENSHOT_DIR`` when set).

Without chromium/chromedriver (or selenium) the tests skip, naming the install command, unless
``INVDEFEND_REQUIRE_BROWSER=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from invdefend.audit import AuditReport, audit
from invdefend.data import digits_split
from invdefend.models import LeNet
from invdefend.monitor import ReleaseRecord
from invdefend.report import write_html_report

pytestmark = pytest.mark.slow

APT_COMMAND = "apt-get install -y chromium chromium-driver"
PIP_COMMAND = "pip install 'selenium>=4.10'"
SECTIONS = ("Settings", "Threat model", "Summary and coverage", "Originals and reconstructions",
            "Predicted against attacked PSNR", "Per-sample results", "Risk over training")


def _unavailable(reason: str) -> None:
    """Skip, or fail where CI requires the browser (``INVDEFEND_REQUIRE_BROWSER=1``)."""
    if os.environ.get("INVDEFEND_REQUIRE_BROWSER") == "1":
        pytest.fail(f"INVDEFEND_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _browser_binaries() -> tuple[str, str]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        _unavailable(f"chromium and chromedriver are not installed; install them with `{APT_COMMAND}` (as root)")
    assert chromium is not None and chromedriver is not None
    return chromium, chromedriver


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """Headless Chromium with the browser console log captured."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable(f"selenium is not installed; install it with `{PIP_COMMAND}`")
    chromium, chromedriver = _browser_binaries()
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def _history(steps: int = 60) -> list[ReleaseRecord]:
    """A synthetic training run: risk estimated every 5th step while the model learns and the budget grows."""
    return [
        ReleaseRecord("gradient", s, "spectral", relative_energy=0.04 + 0.0004 * s, budget=0.04 + 0.0004 * s,
                      refreshed=s % 5 == 0,
                      predicted_psnr=[26.0 - 0.08 * s, 24.0 - 0.05 * s] if s % 5 == 0 else [],
                      undefended_predicted_psnr=[38.0 + 0.1 * s] if s % 5 == 0 else [])
        for s in range(steps)
    ]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditReport, Path]:
    """A real audit of 2 held-out digits on a width-4 LeNet, and its HTML report with a history."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LeNet(in_channels=1, image_size=8, width=4).eval()
        _, _, x, y = digits_split()
        report = audit(model, F.cross_entropy, x[:2], y[:2], attacks=("dlg", "aware"), defenses=("none", "spectral"),
                       iterations=30)
    finally:
        torch.set_num_threads(threads)
    report.settings["data"] = "digits (held-out split, 2 samples)"
    path = write_html_report(report, tmp_path_factory.mktemp("html") / "audit_report.html", history=_history())
    return report, path


@pytest.fixture(scope="module")
def page(driver: Any, audited: tuple[AuditReport, Path]) -> tuple[Any, list[dict[str, Any]]]:
    """The report loaded in the browser, and the console entries logged while loading it."""
    driver.get(audited[1].resolve().as_uri())
    driver.execute_script("return document.readyState")
    return driver, driver.get_log("browser")


def test_every_image_decodes(page: tuple[Any, list[dict[str, Any]]]) -> None:
    driver, _ = page
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
        " i.src.slice(0, 22)]);"
    )
    assert len(images) == 2 * 2 * 2 + 2  # originals + reconstructions per defense, scatter, history
    for alt, complete, width, height, scheme in images:
        assert complete and width > 0 and height > 0, f"image not decoded: {alt}"
        assert scheme == "data:image/png;base64,"


def test_no_console_errors(page: tuple[Any, list[dict[str, Any]]]) -> None:
    driver, logs = page
    severe = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert severe == [], severe
    driver.execute_script("console.error('invdefend probe');")  # the capture itself works: an error shows up
    assert any("invdefend probe" in e["message"] and e["level"] == "SEVERE" for e in driver.get_log("browser"))


def test_sections_and_worst_sample_first(page: tuple[Any, list[dict[str, Any]]],
                                         audited: tuple[AuditReport, Path]) -> None:
    from selenium.webdriver.common.by import By

    driver, _ = page
    report, _ = audited
    headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
    assert headings == list(SECTIONS)
    assert [h.text for h in driver.find_elements(By.CSS_SELECTOR, "figure.defense-grid h3")] == [
        "Defense: none", "Defense: spectral"]
    rows = driver.find_elements(By.CSS_SELECTOR, "table.samples tbody tr")
    assert len(rows) == len(report.samples) == 4
    worst = max(report.samples, key=lambda s: s.best_psnr)
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == [worst.defense, str(worst.index), str(worst.label)]
    assert cells[-3:-1] == [worst.best_attack, f"{worst.best_psnr:.1f}"]
    shown = [float(r.find_elements(By.TAG_NAME, "td")[-2].text) for r in rows]
    assert shown == sorted(shown, reverse=True)
    coverage = driver.find_element(By.CSS_SELECTOR, "p.coverage").text
    assert coverage.startswith("Coverage: ") and "of 4 samples" in coverage and "+ 3.0 dB" in coverage
    assert "honest-but-curious server" in driver.find_element(By.ID, "threat-model").text
    assert "60 releases, steps 0 to 59" in driver.find_element(By.ID, "history").text


def test_full_page_screenshot(page: tuple[Any, list[dict[str, Any]]], tmp_path: Path) -> None:
    driver, _ = page
    width = 1200
    driver.set_window_size(width, 900)
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight;")
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(width, height + chrome)
    assert driver.execute_script("return window.innerHeight;") >= height
    shot = tmp_path / "audit_report.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("INVDEFEND_SCREENSHOT_DIR"):
        folder = Path(os.environ["INVDEFEND_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, folder / "audit_report.png")
