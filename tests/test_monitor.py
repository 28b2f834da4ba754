"""invdefend.monitor: subscribing and unsubscribing callbacks, and the flat per-step scalars of a record."""

from __future__ import annotations

import math

import pytest

from invdefend.monitor import ReleaseRecord, RiskMonitor, record_scalars


def _record(step: int = 0, **kwargs) -> ReleaseRecord:
    return ReleaseRecord(kind="gradient", step=step, mechanism="spectral", relative_energy=0.1, budget=0.1, **kwargs)


class _Sink:
    def __init__(self, name: str, seen: list[tuple[str, int]]) -> None:
        self.name, self.seen = name, seen

    def on_release(self, record: ReleaseRecord) -> None:
        self.seen.append((self.name, record.step))


def test_subscribe_appends_and_first_puts_the_callback_before_the_others() -> None:
    seen: list[tuple[str, int]] = []
    a, b, c = (_Sink(n, seen) for n in "abc")
    monitor = RiskMonitor(callbacks=[a.on_release])
    monitor.subscribe(b.on_release)
    monitor.subscribe(c.on_release, first=True)
    monitor.emit(_record(0))
    assert seen == [("c", 0), ("a", 0), ("b", 0)]
    with pytest.raises(TypeError):
        monitor.subscribe(a.on_release, True)  # type: ignore[misc]  # first is keyword-only


def test_unsubscribe_removes_constructor_and_subscribed_callbacks() -> None:
    seen: list[tuple[str, int]] = []
    a, b = _Sink("a", seen), _Sink("b", seen)
    monitor = RiskMonitor(callbacks=[a.on_release])
    monitor.subscribe(b.on_release)
    monitor.unsubscribe(a.on_release)  # a fresh bound method of the same object matches
    monitor.emit(_record(1))
    monitor.unsubscribe(b.on_release)
    monitor.emit(_record(2))
    assert seen == [("b", 1)]
    assert monitor.callbacks == []


def test_unsubscribe_removes_one_occurrence_of_a_callback_subscribed_twice() -> None:
    seen: list[tuple[str, int]] = []
    a = _Sink("a", seen)
    monitor = RiskMonitor()
    monitor.subscribe(a.on_release)
    monitor.subscribe(a.on_release)
    monitor.unsubscribe(a.on_release)
    monitor.emit(_record(3))
    assert seen == [("a", 3)]


def test_unsubscribe_of_an_unknown_callback_raises_a_clear_error() -> None:
    monitor = RiskMonitor(callbacks=[print])
    with pytest.raises(ValueError, match=r"RiskMonitor\.unsubscribe: .* is not subscribed to this monitor"):
        monitor.unsubscribe(len)
    monitor.unsubscribe(print)
    with pytest.raises(ValueError, match="not subscribed"):
        monitor.unsubscribe(print)


def test_record_scalars_logs_noise_fallback_and_finite_risk() -> None:
    monitor = RiskMonitor(prefix="client1")
    rec = _record(4, refreshed=True, predicted_psnr=[10.0, math.inf, 14.0], leakage=[math.nan],
                  undefended_predicted_psnr=[20.0, 22.0])
    out = record_scalars(rec, monitor.tag)
    g = "invdefend/client1/gradient/"
    assert out == {
        g + "noise/relative_energy": 0.1,
        g + "fallback": 0.0,
        g + "risk/predicted_psnr_max": 14.0,
        g + "risk/predicted_psnr_mean": 12.0,
        g + "risk/undefended_predicted_psnr_max": 22.0,
        g + "risk/undefended_predicted_psnr_mean": 21.0,
    }
    plain = record_scalars(_record(5, fallback=True), monitor.tag)
    assert plain == {g + "noise/relative_energy": 0.1, g + "fallback": 1.0}


def test_the_integrations_share_the_monitor_record_scalars() -> None:
    from invdefend.integrations import huggingface, lightning

    assert lightning.record_scalars is record_scalars
    assert huggingface.record_scalars is record_scalars
