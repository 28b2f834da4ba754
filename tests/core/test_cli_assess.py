"""The ``invdefend`` console script and ``invdefend assess``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from invdefend.cli import main

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "examples" / "model_zoo.py"


def test_console_script_help():
    # The script pip installed next to this interpreter (the venv need not be activated), else the PATH's.
    script = Path(sys.executable).parent / "invdefend"
    out = subprocess.run([str(script) if script.exists() else "invdefend", "--help"], capture_output=True,
                         text=True, check=True)
    assert "assess" in out.stdout


def test_assess_on_the_example_model_with_shipped_digits(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits", "-n", "4", "-k", "8",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_samples"] == 4 and report["settings"]["data"] == "digits"
    assert "PSNR mean" in capsys.readouterr().out


def test_assess_on_an_npz_file_and_embedding_target(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((3, 1, 8, 8)).astype(np.float32), y=np.array([1, 2, 3]))
    out = tmp_path / "r.json"
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", str(data), "--target", "embedding",
                 "-k", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["target"] == "embedding"


def test_assess_errors_name_the_problem(tmp_path, capsys):
    # One line on stderr, exit status 2 (tests/core/test_cli_errors.py covers every case).
    assert main(["assess", "--model", "nocolon", "--data", "digits"]) == 2
    assert "MODULE:CALLABLE" in capsys.readouterr().err
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "npz" in capsys.readouterr().err
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", str(data)]) == 2
    assert "--x-key" in capsys.readouterr().err


def test_threads_are_set_on_purpose_and_restored(tmp_path, monkeypatch, capsys):
    import torch

    from invdefend import cli

    seen = []
    monkeypatch.setattr("invdefend.commands.assess.run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["--threads", "3", "assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits"]) == 0
    monkeypatch.setenv("INVDEFEND_THREADS", "2")
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits"]) == 0
    monkeypatch.delenv("INVDEFEND_THREADS")
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits"]) == 0
    assert seen == [3, 2, 1] and torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        main(["--threads", "0", "assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits"])
    monkeypatch.setenv("INVDEFEND_THREADS", "many")
    capsys.readouterr()
    assert main(["assess", "--model", f"{ZOO}:lenet_digits", "--data", "digits"]) == 2
    assert "INVDEFEND_THREADS='many' must be a positive integer" in capsys.readouterr().err
