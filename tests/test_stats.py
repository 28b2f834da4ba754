"""invdefend.stats: summaries and rank correlations, checked against numpy and scipy (ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sp

from invdefend import stats
from invdefend.invre import summarise as invre_summarise


def _pair(n: int = 40, seed: int = 1) -> tuple[list[float], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen).tolist()
    b = (torch.tensor(a) + 0.7 * torch.randn(n, generator=gen)).tolist()
    return a, b


def test_rank_statistics_match_scipy() -> None:
    a, b = _pair()
    b[3] = b[5]  # a tie
    assert stats.spearman(a, b) == pytest.approx(sp.spearmanr(a, b).statistic, abs=1e-12)
    assert stats.pearson(a, b) == pytest.approx(sp.pearsonr(a, b).statistic, abs=1e-12)
    assert math.isnan(stats.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_ranks_with_many_ties_match_scipy(seed: int) -> None:
    a, b = _pair(n=50, seed=seed)
    a = [round(v, 0) for v in a]  # a handful of distinct values: long runs of ties
    b = [round(2 * v, 0) / 2 for v in b]
    assert stats.ranks(a) == pytest.approx(sp.rankdata(a, method="average").tolist(), abs=0)
    assert stats.ranks(b) == pytest.approx(sp.rankdata(b, method="average").tolist(), abs=0)
    assert stats.spearman(a, b) == pytest.approx(sp.spearmanr(a, b).statistic, abs=1e-12)
    assert stats.pearson(a, b) == pytest.approx(sp.pearsonr(a, b).statistic, abs=1e-12)


def test_ranks_are_one_based_averages() -> None:
    assert stats.ranks([]) == []
    assert stats.ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert stats.ranks([5.0, 5.0, 1.0, 5.0]) == [3.0, 3.0, 1.0, 3.0]


def test_correlations_of_perfectly_ordered_and_reversed_sequences() -> None:
    a = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert stats.spearman(a, [10.0, 20.0, 30.0, 40.0, 50.0]) == pytest.approx(1.0)
    assert stats.spearman(a, [5.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert stats.pearson(a, [2 * v + 1 for v in a]) == pytest.approx(1.0)
    assert math.isnan(stats.spearman([1.0, 1.0], [1.0, 2.0]))  # constant ranks


@pytest.mark.parametrize("a, b", [([1.0], [1.0]), ([1.0, 2.0], [1.0, 2.0, 3.0]), ([], [])])
def test_correlations_reject_short_or_unequal_sequences(a: list[float], b: list[float]) -> None:
    with pytest.raises(ValueError, match="equal length >= 2"):
        stats.pearson(a, b)
    with pytest.raises(ValueError, match="equal length >= 2"):
        stats.spearman(a, b)


def test_summarise_matches_numpy_and_invre() -> None:
    values = [3.0, -1.5, 7.25, 0.0, 2.0, 2.0, 11.0]
    out = stats.summarise(values)
    arr = np.asarray(values)
    assert out == {"mean": float(arr.mean()), "p95": float(np.percentile(arr, 95)),
                   "max": float(arr.max()), "min": float(arr.min())}
    assert stats.summarise(iter(values)) == out  # any iterable
    assert invre_summarise(values) == out  # invre's copy agrees (until it imports this one)
    empty = stats.summarise([])
    assert set(empty) == {"mean", "p95", "max", "min"} and all(math.isnan(v) for v in empty.values())
    assert all(math.isnan(v) for v in stats.summarise([1.0, math.nan]).values())  # not filtered


def test_finite_stats_keep_only_finite_values() -> None:
    values = [1.0, math.inf, 4.0, math.nan, -2.0, -math.inf, 10.0]
    finite = np.asarray([1.0, 4.0, -2.0, 10.0])
    assert stats.finite_stats(values) == {"mean": float(finite.mean()), "p95": float(np.percentile(finite, 95)),
                                          "max": float(finite.max())}
    assert stats.finite_stats([]) == {}
    assert stats.finite_stats([math.nan, math.inf]) == {}
    assert stats.finite_stats([2.5]) == {"mean": 2.5, "p95": 2.5, "max": 2.5}
