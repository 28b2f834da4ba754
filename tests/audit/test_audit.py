"""invdefend.audit: the attack audit (report, files, CLI) and the fidelity study's statistics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from invdefend.attacks import model_gradient
from invdefend.audit import (
    RHO_GRID,
    audit,
    calibrate_rho,
    calibration_split,
    pearson,
    released_gradient,
    save_audit,
    spearman,
)
from invdefend.cli import main
from invdefend.data import load_digits_tensors
from invdefend.models import LeNet
from invdefend.risk import invloss_from_values, predicted_psnr, reference_noise

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


def test_rank_statistics_match_scipy() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, generator=gen).tolist()
    b = (torch.tensor(a) + 0.7 * torch.randn(40, generator=gen)).tolist()
    b[3] = b[5]  # a tie
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_calibration_split_is_disjoint_stratified_and_complete() -> None:
    sizes = [14, 10, 20]
    cal, held = calibration_split(sizes, 4, seed=3)
    assert not set(cal) & set(held)
    assert set(cal) | set(held) == {(g, i) for g, n in enumerate(sizes) for i in range(n)}
    assert [sum(1 for g, _ in cal if g == k) for k in range(3)] == [4, 4, 4]
    assert calibration_split(sizes, 4, seed=3) == (cal, held)  # seeded
    assert calibration_split(sizes, 4, seed=4)[0] != cal
    with pytest.raises(ValueError, match="nothing would be held out"):
        calibration_split([4, 10], 4)


def _synthetic(rho: float, n: int = 30, seed: int = 0) -> list[float]:
    """Predicted PSNR of ``n`` synthetic spectra of different shapes and signal norms under ``rho``."""
    gen = torch.Generator().manual_seed(seed)
    d, m = 64, 500
    decay = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 0.2 + 0.02
    scale = 10 ** (2 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
    s = scale * torch.exp(-decay * torch.arange(d, dtype=torch.float64))
    norm = scale.squeeze(1) * (0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
    tau = reference_noise(norm, m, rho).unsqueeze(1)
    il = invloss_from_values(s, tau, in_dim=d, v0=1 / 12, rank_bound=d)
    return predicted_psnr(il).tolist()


def test_calibrate_rho_recovers_the_precision_that_generated_the_attacks() -> None:
    true_rho = RHO_GRID[7]
    attacked = _synthetic(true_rho)  # the "attacks" behave exactly as InvRE at true_rho
    rho, scores = calibrate_rho(lambda r: (_synthetic(r), attacked), criterion="mse")
    assert rho == pytest.approx(true_rho)
    assert scores[rho] == pytest.approx(0.0, abs=1e-18)
    assert min(scores.values()) == scores[rho]
    rho_s, _ = calibrate_rho(lambda r: (_synthetic(r), attacked), criterion="spearman")
    assert spearman(_synthetic(rho_s), attacked) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="criterion"):
        calibrate_rho(lambda r: ([], []), criterion="r2")


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


def test_cli_audit_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "tinymodel_audit_cli.py"
    factory.write_text(
        "import torch\nfrom invdefend.models import LeNet\n"
        "def make():\n    torch.manual_seed(0)\n    return LeNet(in_channels=1, image_size=8, width=4)\n"
    )
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
