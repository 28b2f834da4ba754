"""The soak benchmark runs and ends with its JSON line (a short run; the 2000-step soak is the benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_soak_quick_run_is_clean(capsys):
    spec = importlib.util.spec_from_file_location("invdefend_bench_soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    threads = torch.get_num_threads()
    try:
        status = soak.main(["--steps", "100", "--max-drift", "3.0"])
    finally:
        torch.set_num_threads(threads)  # the soak pins one thread for steadier timings
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)
    assert {"steps", "rss_growth_mb", "step_time_drift"} <= set(summary)
    assert summary["steps"] == 100 and summary["non_finite_steps"] == 0 and summary["fallback_steps"] == 0
    assert summary["rss_growth_mb"] < 50
    assert status == 0, summary
