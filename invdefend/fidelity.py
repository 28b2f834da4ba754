"""The fidelity study's calibration helpers: split the samples, then choose the attacker precision ``ρ``.

``benchmarks/fidelity.py`` (32×32×3, data prior) and ``benchmarks/fidelity_digits.py`` (8×8) measure how well InvRE's predicted PSNR ranks samples by the PSNR real attacks
reach. InvRE has one free constant, the attacker precision ``ρ``; it is chosen on calibration samples only
and frozen before the held-out samples are scored:

* :func:`calibration_split` — a seeded split, stratified by group (setting), into calibration and held-out
  samples;
* :func:`calibrate_rho` — the ``ρ`` of :data:`RHO_GRID` (or another grid) that best matches the attacks on
  the calibration samples.

The correlations themselves (:func:`~invdefend.stats.spearman`, :func:`~invdefend.stats.pearson`) are in
:mod:`invdefend.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .stats import spearman

__all__ = ["RHO_GRID", "calibration_split", "calibrate_rho"]

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
