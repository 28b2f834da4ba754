"""invdefend.audit: the attack audit (report, files, CLI).

The rank statistics are tested in tests/test_stats.py, the fidelity study's calibration helpers in
tests/test_fidelity.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from invdefend import audit as audit_module
from invdefend import stats
from invdefend.attacks import model_gradient
from invdefend.audit import audit, released_gradient, save_audit
from invdefend.cli import main
from invdefend.data import load_digits_tensors
from invdefend.models import LeNet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = LeNet(in_channels=1, image_size=8, width=4).eval()
    x, y = load_digits_tensors()
    return model, x[:2], y[:2]


def test_audit_reexports_the_rank_statistics_of_invdefend_stats() -> None:
    assert audit_module.spearman is stats.spearman and audit_module.pearson is stats.pearson
    assert {"spearman", "pearson"} <= set(audit_module.__all__)
    assert not {"calibration_split", "calibrate_rho", "RHO_GRID"} & set(audit_module.__all__)


def test_released_gradient_is_exact_without_defense_and_noisy_with_one() -> None:
    model, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    g = model_gradient(model, x[:1], y[:1], F.cross_entropy)
    clean, pred, cov, rel = released_gradient(model, F.cross_entropy, x[:1], y[:1], defense="none")
    assert torch.allclose(clean, g, atol=1e-6) and cov is None and rel == pytest.approx(0.0, abs=1e-10)
    assert math.isfinite(pred)
    noisy, pred_d, cov_d, rel_d = released_gradient(
        model, F.cross_entropy, x[:1], y[:1], defense="isotropic", budget=0.1, seed=1
    )
    assert cov_d is not None and cov_d.sigma2_iso > 0
    assert 0.05 < rel_d < 0.2  # one draw of noise of expected energy 0.1·‖g‖² over m ≈ 1.3k coordinates
    assert pred_d < pred  # the defense lowers the predicted PSNR
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="defense"):
        released_gradient(model, F.cross_entropy, x[:1], y[:1], defense="dp")


def test_audit_writes_json_grid_and_scatter(tmp_path: Path) -> None:
    model, x, y = _tiny()
    report = audit(model, F.cross_entropy, x, y, attacks=("dlg", "aware"), defenses=("none", "isotropic"),
                   budget=0.2, iterations=20)
    files = save_audit(report, tmp_path / "out")
    data = json.loads(files["json"].read_text())
    assert [s["defense"] for s in data["samples"]] == ["none", "none", "isotropic", "isotropic"]
    for s in data["samples"]:
        assert s["best_attack"] in s["attacked_psnr"]
        assert s["best_psnr"] == max(s["attacked_psnr"].values())
        assert ("aware" in s["attacked_psnr"]) == (s["defense"] == "isotropic")  # aware needs a noise model
        assert -1.0 <= s["ssim"][s["best_attack"]] <= 1.0
    summary = data["summary"]
    assert summary["isotropic"]["relative_noise_energy_mean"] > 0.05
    assert summary["isotropic"]["predicted_psnr_mean"] < summary["none"]["predicted_psnr_mean"]
    for key in ("grid", "scatter"):
        assert files[key].read_bytes()[:8] == PNG_MAGIC and files[key].stat().st_size > 2000
    with pytest.raises(ValueError, match="unknown or missing"):
        audit(model, F.cross_entropy, x, y, attacks=("gan",))


def _tiny_factory(tmp_path: Path, name: str) -> Path:
    """A ``FILE.py`` whose ``make()`` builds a seeded width-4 LeNet for 8x8 digits (for the CLI's ``--model``)."""
    factory = tmp_path / f"{name}.py"
    factory.write_text(
        "import torch\nfrom invdefend.models import LeNet\n"
        "def make():\n    torch.manual_seed(0)\n    return LeNet(in_channels=1, image_size=8, width=4)\n"
    )
    return factory


def test_cli_audit_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = _tiny_factory(tmp_path, "tinymodel_audit_cli")
    out = tmp_path / "audit-out"
    code = main(["audit", "--model", f"{factory}:make", "--data", "digits", "-n", "1", "--attacks", "dlg,aware",
                 "--defense", "spectral", "--iterations", "10", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "spectral" in text and "predicted PSNR" in text
    data = json.loads((out / "audit.json").read_text())
    assert data["settings"]["defenses"] == ["none", "spectral"] and data["settings"]["data"] == "digits"
    assert (out / "grid.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "scatter.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------------------
# band_pass: audited against the Gaussian law it approximates (exact SVD), with an isotropic floor


def test_released_gradient_band_pass_law_and_prediction() -> None:
    from invdefend.defense import GradientDefense

    model, x, y = _tiny()
    x1, y1 = x[:1], y[:1]
    g = model_gradient(model, x1, y1, F.cross_entropy).double()
    energy, m = float(g.pow(2).sum()), g.numel()
    _, pred_none, _, _ = released_gradient(model, F.cross_entropy, x1, y1, defense="none")
    released, pred, cov, rel = released_gradient(
        model, F.cross_entropy, x1, y1, defense="band_pass", budget=0.075, floor=0.025, seed=1
    )
    assert released.shape == (m,) and torch.isfinite(released).all()
    assert all(p.grad is None for p in model.parameters())  # the caller's model is untouched
    assert 0.07 < rel < 0.13  # 0.075 exactly (band-pass) + one draw of the 0.025 floor over m ≈ 1.1k coordinates
    assert cov is not None and cov.basis is not None and cov.tau is not None
    assert float(cov.tau.sum()) == pytest.approx(0.075 * energy, rel=1e-5)
    assert cov.sigma2_iso * m == pytest.approx(0.025 * energy, rel=1e-5)
    r = cov.basis.shape[1]
    assert cov.basis.shape == (m, r) and cov.tau.shape == (r,) and 0 < r <= x1[0].numel()
    assert torch.allclose(cov.basis.T @ cov.basis, torch.eye(r, dtype=cov.basis.dtype), atol=1e-8)
    assert (cov.tau >= 0).all()
    # The defense's own record counts only the floor ("floor_only"); the audit counts the band-pass noise too.
    twin = LeNet(in_channels=1, image_size=8, width=4).eval()
    twin.load_state_dict(model.state_dict())
    guard = GradientDefense(twin, F.cross_entropy, mechanism="band_pass", budget=0.075, floor=0.025, probes=1,
                            k=8, refresh_every=1, cold_sweeps=12, seed=1, capture=False)
    guard.capture(x1, y1)
    F.cross_entropy(twin(x1), y1).backward()
    record = guard.protect()
    guard.detach()
    assert record.risk_noise_model == "floor_only"
    floor_only = float(record.predicted_psnr[0])
    assert math.isfinite(pred) and pred < floor_only and pred < pred_none
    with pytest.raises(ValueError, match="floor"):
        released_gradient(model, F.cross_entropy, x1, y1, defense="band_pass", floor=-0.1)


def test_audit_band_pass_runs_the_aware_attack_and_records_the_floor(tmp_path: Path) -> None:
    model, x, y = _tiny()
    report = audit(model, F.cross_entropy, x, y, attacks=("dlg", "aware"), defenses=("none", "band_pass"),
                   budget=0.075, floor=0.025, iterations=30)
    data = json.loads(report.to_json())
    assert data["settings"]["floor"] == 0.025 and data["settings"]["budget"] == 0.075
    assert [s["defense"] for s in data["samples"]] == ["none", "none", "band_pass", "band_pass"]
    for s in data["samples"]:
        assert ("aware" in s["attacked_psnr"]) == (s["defense"] == "band_pass")
        assert math.isfinite(s["predicted_psnr"])
    summary = data["summary"]
    assert 0.05 < summary["band_pass"]["relative_noise_energy_mean"] < 0.15
    assert summary["band_pass"]["predicted_psnr_mean"] < summary["none"]["predicted_psnr_mean"]


def test_cli_audit_band_pass_with_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = _tiny_factory(tmp_path, "tinymodel_audit_bp")
    out = tmp_path / "audit-bp"
    args = ["audit", "--model", f"{factory}:make", "--data", "digits", "-n", "1", "--attacks", "dlg,aware",
            "--defense", "band_pass", "--budget", "0.075", "--iterations", "10", "--out", str(out)]
    assert main([*args, "--floor", "0.025"]) == 0
    assert "band_pass" in capsys.readouterr().out
    data = json.loads((out / "audit.json").read_text())
    assert data["settings"]["defenses"] == ["none", "band_pass"] and data["settings"]["floor"] == 0.025
    assert "aware" in data["samples"][-1]["attacked_psnr"]
    assert main([*args, "--floor", "-1"]) == 2  # refused before the model is built, one line on stderr
    assert "--floor must be a finite number >= 0" in capsys.readouterr().err


def test_prior_attacks_use_the_fitted_priors_and_select_by_ssim_keeps_the_most_similar() -> None:
    from invdefend.prior import GaussianPrior

    model, _, _ = _tiny()
    images, labels = load_digits_tensors()
    x, y = images[:2], labels[:2]
    aux, aux_y = images[100:400], labels[100:400]  # the attacker's auxiliary data, never the audited samples
    prior = GaussianPrior.fit(aux.double(), rank=16)
    class_priors = {int(c): GaussianPrior.fit(aux[aux_y == c].double(), rank=8) for c in aux_y.unique()}
    report = audit(model, F.cross_entropy, x, y, attacks=("dlg", "aware", "prior", "class_prior"),
                   defenses=("none", "isotropic"), budget=1.0, iterations=20, prior=prior, class_priors=class_priors,
                   select_by="ssim", restarts=2)
    assert report.settings["select_by"] == "ssim" and report.settings["restarts"] == 2
    for s in report.samples:
        expected = {"dlg"} if s.defense == "none" else {"dlg", "aware", "prior", "class_prior"}
        assert set(s.ssim) == expected  # prior attacks run only where there is noise to be aware of
        assert s.ssim[s.best_attack] == max(s.ssim.values())
        assert s.best_psnr == s.attacked_psnr[s.best_attack]
    # The kept reconstruction is the selected attack's: its SSIM against the original is the recorded one.
    from invdefend.metrics import ssim

    noisy = [s for s in report.samples if s.defense == "isotropic"]
    recs = report.reconstructions["isotropic"]
    for s, rec in zip(noisy, recs):
        assert float(ssim(rec[None], x[s.index : s.index + 1])[0]) == pytest.approx(s.ssim[s.best_attack], abs=1e-5)
    with pytest.raises(ValueError, match="class_priors= holding label"):
        audit(model, F.cross_entropy, x, y, attacks=("class_prior",), defenses=("isotropic",), iterations=5,
              class_priors={99: prior})
    with pytest.raises(ValueError, match="select_by"):
        audit(model, F.cross_entropy, x, y, select_by="lpips")
    with pytest.raises(ValueError, match="restarts"):
        audit(model, F.cross_entropy, x, y, restarts=0)


def test_cli_audit_fits_the_attacker_priors_beyond_the_audited_samples(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    factory = _tiny_factory(tmp_path, "tinymodel_audit_prior")
    out = tmp_path / "audit-prior"
    code = main(["audit", "--model", f"{factory}:make", "--data", "digits", "-n", "1", "--attacks", "dlg,prior,class_prior",
                 "--prior-samples", "64", "--defense", "isotropic", "--budget", "0.5", "--iterations", "5",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "attacker priors fitted on 64 samples of --data (not audited)" in text
    noisy = [s for s in json.loads((out / "audit.json").read_text())["samples"] if s["defense"] == "isotropic"]
    assert set(noisy[0]["attacked_psnr"]) == {"dlg", "prior", "class_prior"}
    # Asked for explicitly, the prior attacks are refused (exit 2, one line) when the data cannot fit a prior.
    code = main(["audit", "--model", f"{factory}:make", "--data", "digits", "-n", "1", "--attacks", "prior",
                 "--prior-samples", "8", "--iterations", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the prior attacks need at least 32 samples" in err[0]
