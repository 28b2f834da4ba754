"""The small statistics the project reports: summaries of per-sample values and rank correlations.

* :func:`summarise` — ``{"mean", "p95", "max", "min"}`` of a list of values (InvRE's report aggregates);
* :func:`finite_stats` — ``{"mean", "p95", "max"}`` of the finite values only, ``{}`` when there are none
  (what :class:`~invdefend.monitor.RiskMonitor` writes to TensorBoard);
* :func:`ranks`, :func:`pearson`, :func:`spearman` — average ranks (ties share the mean of their
  positions) and the Pearson and Spearman correlations the fidelity study and the audit report.

``p95`` is numpy's default (linearly interpolated) 95th percentile.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["summarise", "finite_stats", "ranks", "pearson", "spearman"]


def summarise(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "p95", "max", "min"}`` of ``values``; every entry ``nan`` when there are none.

    Values are not filtered: a ``nan`` among them makes every entry ``nan`` (see :func:`finite_stats` for
    the finite-only variant).
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "p95": math.nan, "max": math.nan, "min": math.nan}
    return {
        "mean": float(arr.mean()),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "min": float(arr.min()),
    }


def finite_stats(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "p95", "max"}`` of the finite values of ``values``; ``{}`` when none is finite."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {}
    return {"mean": float(arr.mean()), "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their positions (``scipy.stats.rankdata``'s
    ``"average"`` method)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (``nan`` when either is constant)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"invdefend.stats.pearson: need two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled)."""
    return pearson(ranks(list(a)), ranks(list(b)))
