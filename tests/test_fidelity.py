"""invdefend.fidelity: the fidelity study's calibration split and choice of the attacker precision ρ."""

from __future__ import annotations

import math

import pytest
import torch

from invdefend.fidelity import (
    RHO_GRID,
    NoCoverageTarget,
    calibrate_rho,
    calibration_pairs_needed,
    calibration_split,
    coverage_confidence,
    cross_validated_coverage,
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


def _runs(gen: torch.Generator, n_runs: int, pairs: int, run_sd: float) -> list[torch.Tensor]:
    """Excesses (attacked − predicted dB) of ``n_runs`` runs: a shift per run (its models, its prior) plus a
    shift per pair."""
    return [run_sd * torch.randn(1, generator=gen) + torch.randn(pairs, generator=gen) for _ in range(n_runs)]


def _offset_fit(train: list[torch.Tensor], c: float) -> float:
    """The least offset covering a share ``c`` of the pooled training excesses (a one-parameter calibration)."""
    pooled = torch.sort(torch.cat(train)).values
    return float(pooled[min(len(pooled), math.ceil(c * len(pooled))) - 1])


def test_cross_validated_coverage_picks_the_least_candidate_every_left_out_run_meets() -> None:
    gen = torch.Generator().manual_seed(3)
    runs = _runs(gen, 3, 300, run_sd=0.6)
    cands = [0.95, 0.96, 0.97, 0.98, 0.99, 1.0]

    def held(c: float, r: int) -> float:
        offset = _offset_fit([x for i, x in enumerate(runs) if i != r], c)
        return float((runs[r] <= offset).double().mean())

    chosen, table = cross_validated_coverage(held, 3, cands)
    brute = [c for c in cands if all(held(c, r) >= 0.95 for r in range(3))]
    assert chosen == brute[0]
    assert sorted(table) == [c for c in cands if c <= chosen]  # stops at the first that works
    assert table[chosen] == [held(chosen, r) for r in range(3)]


def test_cross_validated_coverage_keeps_a_new_run_covered_where_pooled_calibration_does_not() -> None:
    """Monte-Carlo with a run effect: demanding 0.95 of the pooled calibration pairs leaves a fresh run below
    0.95 about half the time; the leave-one-run-out choice does so much less often."""
    gen = torch.Generator().manual_seed(0)
    cands = [0.95 + 0.005 * i for i in range(11)]
    naive_ok, cv_ok, trials = 0, 0, 200
    for _ in range(trials):
        runs = _runs(gen, 4, 200, run_sd=0.5)
        cal, fresh = runs[:3], runs[3]

        def held(c: float, r: int, cal: list[torch.Tensor] = cal) -> float:
            offset = _offset_fit([x for i, x in enumerate(cal) if i != r], c)
            return float((cal[r] <= offset).double().mean())

        try:
            chosen, _ = cross_validated_coverage(held, 3, cands)
        except ValueError:
            chosen = 1.0
        naive_ok += float((fresh <= _offset_fit(cal, 0.95)).double().mean()) >= 0.95
        cv_ok += float((fresh <= _offset_fit(cal, chosen)).double().mean()) >= 0.95
    assert naive_ok / trials < 0.7
    assert cv_ok / trials > naive_ok / trials + 0.15


def test_cross_validated_coverage_rejects_bad_input_and_says_when_nothing_works() -> None:
    with pytest.raises(ValueError, match="at least two"):
        cross_validated_coverage(lambda c, r: 1.0, 1, [0.95])
    with pytest.raises(ValueError, match="shares in"):
        cross_validated_coverage(lambda c, r: 1.0, 3, [])
    with pytest.raises(ValueError, match="shares in"):
        cross_validated_coverage(lambda c, r: 1.0, 3, [1.5])
    with pytest.raises(NoCoverageTarget, match="no candidate") as err:
        cross_validated_coverage(lambda c, r: 0.9 + 0.01 * r, 3, [0.95, 1.0])
    assert err.value.table == {0.95: [0.9, 0.91, 0.92], 1.0: [0.9, 0.91, 0.92]}
