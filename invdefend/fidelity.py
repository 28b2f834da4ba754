"""The fidelity study's calibration helpers: split the samples, then choose the attacker precision ``ρ``.

``benchmarks/fidelity.py`` (32×32×3, data prior) and ``benchmarks/fidelity_digits.py`` (8×8) measure how well InvRE's predicted PSNR ranks samples by the PSNR real attacks
reach. InvRE has one free constant, the attacker precision ``ρ``; it is chosen on calibration samples only
and frozen before the held-out samples are scored:

* :func:`calibration_split` — a seeded split, stratified by group (setting), into calibration and held-out
  samples;
* :func:`calibrate_rho` — the ``ρ`` of :data:`RHO_GRID` (or another grid) that best matches the attacks on
  the calibration samples;
* :func:`coverage_confidence` and :func:`calibration_pairs_needed` — how sure a calibration that covered its
  pairs makes you that new pairs will be covered, and how many calibration pairs that takes;
* :func:`cross_validated_coverage` — when the calibration pairs come from several independent runs (other
  models, other priors, other samples), the calibration coverage to demand, chosen by leaving one run out.

The correlations themselves (:func:`~invdefend.stats.spearman`, :func:`~invdefend.stats.pearson`) are in
:mod:`invdefend.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .stats import spearman

__all__ = [
    "RHO_GRID",
    "NoCoverageTarget",
    "calibrate_rho",
    "calibration_pairs_needed",
    "calibration_split",
    "coverage_confidence",
    "cross_validated_coverage",
]

#: The log grid of attacker precisions searched by :func:`calibrate_rho` (1e-5 … 1, 4 points per decade).
RHO_GRID: tuple[float, ...] = tuple(10.0 ** (e / 4) for e in range(-20, 1))


def calibration_split(
    group_sizes: Sequence[int], per_group: int, *, seed: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split samples, stratified by group (setting), into calibration and held-out ``(group, index)`` lists.

    ``per_group`` samples of every group, drawn with a seeded permutation, go to calibration; the rest are
    held out. The two lists are disjoint and together cover every sample.
    """
    if per_group < 1:
        raise ValueError(f"invdefend.fidelity.calibration_split: per_group={per_group} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    cal: list[tuple[int, int]] = []
    held: list[tuple[int, int]] = []
    for g, size in enumerate(group_sizes):
        if size <= per_group:
            raise ValueError(
                f"invdefend.fidelity.calibration_split: group {g} has {size} samples, not more than per_group="
                f"{per_group}; nothing would be held out"
            )
        perm = torch.randperm(size, generator=gen).tolist()
        cal += [(g, i) for i in sorted(perm[:per_group])]
        held += [(g, i) for i in sorted(perm[per_group:])]
    return cal, held


def calibrate_rho(
    evaluate: Callable[[float], tuple[Sequence[float], Sequence[float]]],
    *,
    grid: Sequence[float] = RHO_GRID,
    criterion: str = "mse",
) -> tuple[float, dict[float, float]]:
    """Choose the attacker precision ``ρ`` from ``grid`` on calibration samples.

    Args:
        evaluate: ``evaluate(rho) -> (predicted_psnr, attacked_psnr)`` of the *calibration* samples only.
        grid: candidate values of ``ρ``.
        criterion: ``"mse"`` (least mean squared dB error between prediction and attack) or ``"spearman"``
            (highest rank correlation; ties broken by the smaller squared error).

    Returns:
        The chosen ``ρ`` and the score of every grid point (mean squared error, or −Spearman).
    """
    if criterion not in ("mse", "spearman"):
        raise ValueError(f"invdefend.fidelity.calibrate_rho: criterion={criterion!r}; choose 'mse' or 'spearman'")
    if not grid:
        raise ValueError("invdefend.fidelity.calibrate_rho: empty grid")
    scores: dict[float, float] = {}
    keys: dict[float, tuple[float, float]] = {}
    for rho in grid:
        pred, att = evaluate(float(rho))
        err = sum((p - a) ** 2 for p, a in zip(pred, att)) / max(len(pred), 1)
        if criterion == "mse":
            scores[rho] = err
            keys[rho] = (err, 0.0)
        else:
            rs = spearman(pred, att)
            rs = -1.0 if math.isnan(rs) else rs
            scores[rho] = -rs
            keys[rho] = (-round(rs, 12), err)
    best = min(grid, key=lambda r: keys[r])
    return float(best), scores


def coverage_confidence(n_pairs: int, missed: int = 0, target: float = 0.95) -> float:
    """The probability that a prediction calibrated to cover all but ``missed`` of ``n_pairs`` calibration
    pairs covers at least a share ``target`` of new pairs.

    The split-conformal order-statistic argument: for exchangeable pairs with continuous excesses (attacked
    minus predicted PSNR), a threshold at the ``k = n_pairs − missed``-th smallest calibration excess covers a
    share of new pairs distributed as ``Beta(k, n_pairs + 1 − k)``, so the probability is
    ``P(Binomial(n_pairs, target) ≤ k − 1)``; with nothing missed, ``1 − target**n_pairs``.

    Optimistic for a real calibration: choosing ``ρ`` on the same pairs, and pairs that share a sample (one
    sample released at several noise levels), both make the effective count smaller.
    """
    if n_pairs < 1:
        raise ValueError(f"invdefend.fidelity.coverage_confidence: n_pairs={n_pairs} must be >= 1")
    if not 0 <= missed < n_pairs:
        raise ValueError(f"invdefend.fidelity.coverage_confidence: missed={missed} must be in [0, n_pairs)")
    if not 0.0 < target < 1.0:
        raise ValueError(f"invdefend.fidelity.coverage_confidence: target={target} must be in (0, 1)")
    k = n_pairs - missed
    return sum(math.comb(n_pairs, j) * target**j * (1 - target) ** (n_pairs - j) for j in range(k))


def calibration_pairs_needed(confidence: float = 0.95, target: float = 0.95) -> int:
    """The fewest calibration pairs which, all covered, give :func:`coverage_confidence` ≥ ``confidence``
    (``⌈log(1 − confidence) / log(target)⌉``: 59 for 0.95 and 0.95)."""
    if not 0.0 < confidence < 1.0 or not 0.0 < target < 1.0:
        raise ValueError(
            f"invdefend.fidelity.calibration_pairs_needed: confidence={confidence} and target={target} must be in "
            "(0, 1)"
        )
    n = max(1, math.ceil(math.log1p(-confidence) / math.log(target) - 1e-12))
    while coverage_confidence(n, 0, target) < confidence:
        n += 1
    return n


class NoCoverageTarget(ValueError):
    """No candidate calibration coverage keeps every left-out run at the required coverage; ``table`` holds the
    left-out coverage of every run for every candidate tried."""

    def __init__(self, message: str, table: dict[float, list[float]]) -> None:
        super().__init__(message)
        self.table = table


def cross_validated_coverage(
    held_out_coverage: Callable[[float, int], float],
    n_runs: int,
    candidates: Sequence[float],
    *,
    required: float = 0.95,
) -> tuple[float, dict[float, list[float]]]:
    """The calibration coverage to demand, chosen by leaving one calibration run out.

    Pairs of one run share its models and its prior, so they are not exchangeable with another run's, and a
    calibration that covers a share ``c`` of its pairs covers less of a new run's (the order-statistic bound of
    :func:`coverage_confidence` assumes exchangeable pairs). For every candidate ``c`` and every run ``r``,
    ``held_out_coverage(c, r)`` fits on the other runs' pairs with calibration coverage ≥ ``c`` and returns the
    coverage on run ``r``'s pairs. The answer is the smallest candidate whose every left-out run reaches
    ``required``.

    Returns:
        The chosen candidate and, for every candidate tried, the left-out coverage of each run. Candidates above
        the first that works are not tried.

    Raises:
        ValueError: fewer than two runs, no candidate, or a candidate outside ``(0, 1]``.
        NoCoverageTarget: no candidate for which every left-out run reaches ``required`` (then more runs, or a
            model that fits them, are needed); it carries the table.
    """
    if n_runs < 2:
        raise ValueError(
            f"invdefend.fidelity.cross_validated_coverage: n_runs={n_runs}; leaving one run out needs at least two "
            "calibration runs"
        )
    if not candidates or not all(0.0 < c <= 1.0 for c in candidates):
        raise ValueError(
            f"invdefend.fidelity.cross_validated_coverage: candidates={list(candidates)} must be a non-empty list of "
            "shares in (0, 1]"
        )
    if not 0.0 < required <= 1.0:
        raise ValueError(f"invdefend.fidelity.cross_validated_coverage: required={required} must be in (0, 1]")
    table: dict[float, list[float]] = {}
    for c in sorted(candidates):
        table[c] = [float(held_out_coverage(c, r)) for r in range(n_runs)]
        if min(table[c]) >= required:
            return c, table
    raise NoCoverageTarget(
        "invdefend.fidelity.cross_validated_coverage: no candidate calibration coverage keeps every left-out run at "
        f">= {required} (left-out coverages: {table}); add calibration runs or a model that fits them",
        table,
    )
