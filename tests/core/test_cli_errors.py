"""A new user's mistakes on the ``invdefend`` command line: one line on stderr, exit status 2, no traceback.

Each case runs :func:`invdefend.cli.main` in-process; one runs the module in a subprocess to show that no
traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from invdefend.cli import main
from invdefend.commands import assess, audit, demo
from invdefend.commands.assess import load_data, samples_used
from invdefend.commands.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]

ZOO = '''
import torch
from torch import nn

from invdefend.models import LeNet


def lenet():
    torch.manual_seed(0)
    return LeNet(in_channels=1, image_size=8, width=4)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def not_a_model():
    return 42


_hidden = lenet
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A model file and .npz files, each holding one mistake (or none: ``ok``)."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "cli_errors_zoo.py").write_text(ZOO)
    rng = np.random.default_rng(0)
    gray = rng.random((5, 1, 8, 8)).astype(np.float32)
    arrays = {
        "ok": {"x": gray, "y": np.arange(5)},
        "rgb": {"x": rng.random((5, 3, 8, 8)).astype(np.float32), "y": np.arange(5)},
        "short": {"x": gray, "y": np.arange(3)},
        "keyed": {"inputs": gray, "labels": np.arange(5)},
        "labels": {"x": gray, "y": np.arange(5) + 8},
        "normalised": {"x": (gray - 0.5) / 0.1, "y": np.arange(5)},
    }
    out = {"zoo": str(root / "cli_errors_zoo.py"), "missing": str(root / "missing.py"),
           "foreign": str(root / "foreign.pt"), "corrupt": str(root / "corrupt.pt")}
    torch.save({"weight": torch.zeros(1)}, out["foreign"])
    Path(out["corrupt"]).write_text("not a checkpoint")
    for name, content in arrays.items():
        np.savez(root / f"{name}.npz", **content)
        out[name] = str(root / f"{name}.npz")
    return out


def _assess(model: str, data: str, *extra: str) -> list[str]:
    return ["assess", "--model", model, "--data", data, "-k", "2", *extra]


def _audit(model: str, data: str, *extra: str) -> list[str]:
    return ["audit", "--model", model, "--data", data, "-n", "1", "--iterations", "1", *extra]


#: id -> (argv from the files, words the one line must hold).
CASES: dict[str, tuple[Callable[[dict[str, str]], list[str]], list[str]]] = {
    "model-not-a-spec": (lambda f: _assess("nocolon", "digits"), ["--model 'nocolon'", "MODULE:CALLABLE"]),
    "model-unknown-module": (lambda f: _assess("no_such_module_xyz:make", "digits"),
                             ["no module named 'no_such_module_xyz'", "MODULE:CALLABLE", "FILE.py:CALLABLE"]),
    "model-missing-file": (lambda f: _assess(f"{f['missing']}:make", "digits"),
                           ["missing.py does not exist", "FILE.py:CALLABLE"]),
    "model-missing-callable-in-file": (lambda f: _assess(f"{f['zoo']}:nope", f["ok"]),
                                       ["no callable 'nope'", "(available: lenet, mlp, not_a_model, small_cnn)",
                                        "FILE.py:CALLABLE"]),
    "model-missing-callable-in-module": (lambda f: _assess("invdefend.models:nope", "digits"),
                                         ["no callable 'nope'", "available: ", "LeNet", "MODULE:CALLABLE"]),
    "model-not-a-module": (lambda f: _assess(f"{f['zoo']}:not_a_model", f["ok"]),
                           ["returned int, not an nn.Module"]),
    "checkpoint-missing": (lambda f: _assess(f"{f['zoo']}:lenet", f["ok"], "--checkpoint", f["missing"] + ".pt"),
                           ["--checkpoint", "does not exist", "torch.save"]),
    "checkpoint-of-another-model": (lambda f: _assess(f"{f['zoo']}:lenet", f["ok"], "--checkpoint", f["foreign"]),
                                    ["does not fit --model", "Unexpected key(s)", "weight"]),
    "checkpoint-corrupt": (lambda f: _assess(f"{f['zoo']}:lenet", f["ok"], "--checkpoint", f["corrupt"]),
                           ["cannot be loaded", "model.state_dict()"]),
    "rgb-into-1-channel-assess": (lambda f: _assess(f"{f['zoo']}:lenet", f["rgb"]),
                                  ["(3, 8, 8)", "(1, H, W)", "in_channels=1"]),
    "rgb-into-1-channel-audit-batchnorm-model": (lambda f: _audit(f"{f['zoo']}:small_cnn", f["rgb"]),
                                                 ["(3, 8, 8)", "(1, H, W)", "Conv2d with in_channels=1"]),
    "features-into-linear": (lambda f: _assess(f"{f['zoo']}:mlp", f["rgb"]),
                             ["(3, 8, 8)", "64 features", "in_features=64"]),
    "budget-negative-audit": (lambda f: _audit(f"{f['missing']}:make", "digits", "--budget", "-0.1"),
                              ["--budget must be a finite number >= 0", "||g||^2", "; use e.g. --budget 0.05"]),
    "budget-nan-audit": (lambda f: _audit(f"{f['zoo']}:lenet", "digits", "--budget", "nan"),
                         ["--budget must be a finite number >= 0", "got nan"]),
    "budget-negative-demo": (lambda f: ["demo", "--budget", "-1"], ["--budget must be a finite number > 0",
                                                                     "e.g. --budget"]),
    "budget-zero-demo": (lambda f: ["demo", "--budget", "0"], ["--budget must be a finite number > 0", "got 0.0"]),
    "floor-negative-audit": (lambda f: _audit(f"{f['zoo']}:lenet", "digits", "--floor", "-1"),
                             ["--floor must be a finite number >= 0"]),
    "data-not-unit-range": (lambda f: _assess(f"{f['zoo']}:lenet", f["normalised"]),
                            ["inputs span", "neither [0, 1] nor 0-255", "--dynamic-range"]),
    "labels-shorter-than-inputs": (lambda f: _assess(f"{f['zoo']}:lenet", f["short"]),
                                   ["3 labels", "5 inputs", "one label per input"]),
    "labels-beyond-classes": (lambda f: _assess(f"{f['zoo']}:lenet", f["labels"], "-n", "5"),
                              ["labels span 8..12", "10 classes"]),
    "n-zero": (lambda f: _assess(f"{f['zoo']}:lenet", f["ok"], "-n", "0"), ["-n must be >= 1", "got 0"]),
    "n-negative-audit": (lambda f: [*_audit(f"{f['missing']}:make", "digits"), "-n", "-2"],
                         ["-n must be >= 1", "got -2"]),
    "attacks-unknown": (lambda f: _audit(f"{f['zoo']}:lenet", "digits", "--attacks", "dlg,foo"),
                        ["--attacks 'dlg,foo'", "unknown foo", "dlg, ig, idlg, aware"]),
    "attacks-empty": (lambda f: _audit(f"{f['zoo']}:lenet", "digits", "--attacks", ","), ["--attacks", "dlg, ig"]),
    "runs-unknown-demo": (lambda f: ["demo", "--runs", "default,fast"], ["unknown fast", "undefended"]),
    "x-key-missing": (lambda f: _assess(f"{f['zoo']}:lenet", f["keyed"]),
                      ["no array 'x'", "it holds inputs, labels", "--x-key"]),
    "y-key-missing": (lambda f: _assess(f"{f['zoo']}:lenet", f["ok"], "--y-key", "labels"),
                      ["no array 'labels'", "it holds x, y", "--y-key"]),
    "data-missing": (lambda f: _assess(f"{f['zoo']}:lenet", "data.csv"), ["--data 'data.csv'", "digits"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_exit_status_2(
    case: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv, words = CASES[case][0](files), CASES[case][1]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"invdefend {argv[0]}: ") and "; " in lines[0]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    if "rgb" in case or "linear" in case:
        assert "BatchNorm" not in lines[0]


def test_no_traceback_reaches_the_terminal(files: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "invdefend.cli", *_assess(f"{files['zoo']}:lenet", files["rgb"], "-n", "2")],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("invdefend assess: the model cannot take --data samples shaped (3, 8, 8)")


def test_a_bug_keeps_its_traceback(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only :class:`UsageError` is turned into a line: anything else propagates."""
    monkeypatch.setattr("invdefend.commands.assess.run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(_assess(f"{files['zoo']}:lenet", files["ok"]))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_0_255_data_is_divided_by_255_with_a_notice(
    dtype: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = np.arange(2 * 64).reshape(2, 1, 8, 8).astype(dtype)
    np.savez(tmp_path / "bytes.npz", x=pixels, y=np.array([0, 1]))
    x, y = load_data(str(tmp_path / "bytes.npz"), 2, command="audit")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("invdefend audit: --data ") and "divided by 255" in out
    assert torch.allclose(x, torch.as_tensor(pixels, dtype=torch.float32) / 255) and y is not None
    assert load_data(str(tmp_path / "bytes.npz"), 2, unit_range=False)[0].max() == 127  # --dynamic-range set


def test_n_beyond_the_data_is_clamped_with_a_notice(capsys: pytest.CaptureFixture[str]) -> None:
    assert samples_used(5, 9, "d.npz", "audit") == 5
    assert capsys.readouterr().out == "invdefend audit: -n 9 but --data d.npz holds 5 samples; using 5\n"
    assert samples_used(5, 3, "d.npz", "audit") == 3 and capsys.readouterr().out == ""


def test_every_flag_states_its_default() -> None:
    for module in (assess, audit, demo):
        parser = module.add_parser(argparse.ArgumentParser().add_subparsers())
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = action.help or ""
                assert "default" in text or "(required)" in text, (parser.prog, action.option_strings, text)


def test_usage_error_is_what_the_commands_raise(files: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="available: lenet, mlp, not_a_model, small_cnn"):
        assess.load_callable(f"{files['zoo']}:nope")


def test_a_shape_error_in_the_jacobian_gives_no_batchnorm_advice() -> None:
    from invdefend.jacobian import JacobianError, gradient_jacobian

    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    with pytest.raises(JacobianError) as caught:
        gradient_jacobian(model, nn.CrossEntropyLoss(), torch.rand(2, 5), torch.tensor([0, 1]))
    assert "(Linear)" in str(caught.value) and "BatchNorm" not in str(caught.value)
