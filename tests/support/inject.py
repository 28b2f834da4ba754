"""Failure injection through a defense's public ``estimator`` seam (on ``pythonpath`` via setup.cfg)."""

from __future__ import annotations

from collections.abc import Callable

from invdefend.spectral import Spectrum


def after_estimate(defense, hook: Callable[[], None]) -> None:
    """Run ``hook()`` after every estimate of ``defense`` (raise inside it to make that estimate fail)."""
    wrap_estimate(defense, lambda spec: (hook(), spec)[1])


def wrap_estimate(defense, change: Callable[[Spectrum], Spectrum]) -> None:
    """Pass every estimate of ``defense`` through ``change`` before the defense's trust check sees it."""
    real = defense.estimator.estimate

    def estimate(op):
        return change(real(op))

    defense.estimator.estimate = estimate
