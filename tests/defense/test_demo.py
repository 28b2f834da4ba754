"""``invdefend demo``: the runs, their logs, the table, the PNG — and the full command in a fresh process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from tbparse import SummaryReader

from invdefend.demo import DemoConfig, format_table, plot_risk, run_demo, train_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_runs_returns_models_records_and_logs(tmp_path) -> None:
    config = DemoConfig(out=str(tmp_path), epochs=1, refresh_every=20, mechanisms=("monitor", "spectral"))
    runs = train_runs(config)
    assert [r.name for r in runs.runs] == ["undefended", "spectral"]
    plain, defended = runs.by_name("undefended"), runs.by_name("spectral")
    steps = math.ceil(len(runs.x_train) / config.batch_size)
    for r in runs.runs:
        assert len(r.records) == len(r.step_seconds) == steps
        assert 0.1 < r.accuracy <= 1.0  # one epoch: well above chance
        assert list(r.log_dir.glob("events.out.tfevents.*"))
        assert sum(p.numel() for p in r.model.parameters()) == 9930  # the trained model, kept for audits
    assert plain.noise_energy() == 0.0 and defended.noise_energy() > 0
    # Same samples, same risk model: the defense lowers the predicted PSNR.
    assert defended.risk("max") < plain.risk("max")
    assert plain.risk("mean") == pytest.approx(plain.undefended_risk("mean"))
    table = format_table(runs.runs)
    assert "undefended" in table and "spectral" in table and "step time" in table
    png = plot_risk(runs.runs, tmp_path / "risk.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    tags = set(SummaryReader(str(defended.log_dir)).scalars["tag"])
    assert {"invdefend/gradient/risk/predicted_psnr_max", "invdefend/demo/test_accuracy"} <= tags


def test_run_demo_writes_summary_and_png(tmp_path, capsys) -> None:
    result = run_demo(DemoConfig(out=str(tmp_path), epochs=1, refresh_every=40, mechanisms=("monitor", "spectral")))
    out = capsys.readouterr().out
    assert result.table in out and "tensorboard --logdir" in out
    summary = json.loads(result.summary.read_text())
    assert set(summary["runs"]) == {"undefended", "spectral"}
    assert summary["runs"]["undefended"]["step_time_ratio"] == pytest.approx(1.0)
    assert result.png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_invdefend_demo_command_end_to_end(tmp_path) -> None:
    """The README's main job: exits 0, writes event files and the PNG, accuracy within 1 pp, under 3 minutes."""
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}  # no fallback, no vmap fallback
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from invdefend.cli import main; sys.exit(main())", "demo", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("undefended", "spectral", "isotropic"):
        assert list((out / name).glob("events.out.tfevents.*")), name
    assert (out / "risk.png").read_bytes()[:8] == PNG_MAGIC
    runs = json.loads((out / "summary.json").read_text())["runs"]
    gap = abs(runs["spectral"]["test_accuracy"] - runs["undefended"]["test_accuracy"])
    assert gap <= 0.01, runs
    assert runs["spectral"]["fallbacks"] == 0
    assert runs["spectral"]["predicted_psnr_max"] < runs["undefended"]["predicted_psnr_max"] - 20
    assert "test acc" in proc.stdout and "undefended" in proc.stdout
    assert elapsed < 180, elapsed
