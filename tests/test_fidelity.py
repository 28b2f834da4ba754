"""invdefend.fidelity: the fidelity study's calibration split and choice of the attacker precision ρ."""

from __future__ import annotations

import math

import pytest
import torch

from invdefend.fidelity import (
    RHO_GRID,
    calibrate_rho,
    calibration_pairs_needed,
    calibration_split,
    coverage_confidence,
)
from invdefend.risk import invloss_from_values, predicted_psnr, reference_noise
from invdefend.stats import spearman


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


@pytest.mark.parametrize(("n", "missed"), [(40, 0), (80, 1), (20, 2)])
def test_coverage_confidence_matches_monte_carlo_of_the_order_statistic(n: int, missed: int) -> None:
    # Exchangeable continuous excesses: take them uniform, so a threshold's true coverage is its own value.
    gen = torch.Generator().manual_seed(n + missed)
    trials = 40_000
    scores = torch.rand(trials, n, generator=gen, dtype=torch.float64)
    threshold = scores.sort(dim=1).values[:, n - missed - 1]  # covers all but `missed` calibration pairs
    empirical = float((threshold >= 0.95).double().mean())
    predicted = coverage_confidence(n, missed, 0.95)
    assert abs(empirical - predicted) < 4 * math.sqrt(predicted * (1 - predicted) / trials) + 1e-3


def test_coverage_confidence_closed_form_and_pairs_needed() -> None:
    assert coverage_confidence(40) == pytest.approx(1 - 0.95**40, abs=1e-12)
    assert coverage_confidence(80, 1) < coverage_confidence(80, 0)
    assert calibration_pairs_needed(0.95, 0.95) == 59
    assert coverage_confidence(59) >= 0.95 > coverage_confidence(58)
    with pytest.raises(ValueError, match="missed"):
        coverage_confidence(10, 10)
    with pytest.raises(ValueError, match="target"):
        coverage_confidence(10, 0, 1.0)
