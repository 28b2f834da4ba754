"""What a defense records at every release, and where it goes: TensorBoard and plain callbacks.

Every protected release produces a :class:`ReleaseRecord`. A :class:`RiskMonitor` forwards it to any
number of callbacks (``record -> None``) and, when given a ``SummaryWriter`` (the user's own, or one it
opens on a log directory), writes it under the stable tag namespace::

    invdefend/<kind>/risk/predicted_psnr_{mean,p95,max}        risk with the defense's noise
    invdefend/<kind>/risk/leakage_{mean,p95,max}
    invdefend/<kind>/risk/undefended_predicted_psnr_{mean,max} same samples, reference precision only
    invdefend/<kind>/risk/cumulative_predicted_psnr_{mean,p95,max} over every release the batch's samples took
                                                                part in (held-Jacobian model: a lower bound)
    invdefend/<kind>/releases/max_count                         most releases any sample of the batch had
    invdefend/<kind>/noise/relative_energy                     E‖noise‖² / ‖signal‖²
    invdefend/<kind>/spectrum/log10_singular_values            histogram
    invdefend/<kind>/estimator/{max_residual,sweeps,seconds}    estimator error (backward error relative
                                                                to σ₁²), sweeps and wall time of an estimate
    invdefend/<kind>/fallback                                   1 on a fail-closed step, else 0
    invdefend/<kind>/budget/relative_energy_target              the budget in force
    invdefend/<kind>/risk/target_reached                        target mode: 1 if every probe reached it
    invdefend/<kind>/probe/reconstruction                       image: a probe | its reconstruction by a
                                                                fast attack (``reconstruct_probe``, refreshes)
    invdefend/<kind>/probe/attack_{psnr,ssim,seconds}           that reconstruction's PSNR, SSIM, wall time

and once, in the same run directory (no sub-run), the defense's settings as TensorBoard hparams
(:meth:`RiskMonitor.write_hparams`) with some of the tags above as their metrics.

``<kind>`` is ``gradient`` or ``embedding``; with ``prefix="client3"`` tags read ``invdefend/client3/<kind>/...``.
Risk and estimator tags are written when the spectrum was (re-)estimated; ``noise/relative_energy`` every
release; ``budget`` and ``fallback`` whenever they change (the value before the change is written at the
previous step, so TensorBoard draws a step function) and on every refresh — this keeps the per-step cost
of logging to one scalar in steady state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .stats import finite_stats

__all__ = [
    "TAG_PREFIX", "HParam", "ReleaseRecord", "RiskMonitor", "format_refreshes", "hparam_values", "logger",
    "probe_image", "record_scalars",
]

TAG_PREFIX = "invdefend"
logger = logging.getLogger("invdefend")
HParam = str | int | float | bool
#: Probe images are upscaled (nearest neighbour, by a whole factor) until their longer side reaches this.
PROBE_IMAGE_SIDE = 64


@dataclass
class ReleaseRecord:
    """One protected release (a gradient step or an embedding batch).

    Risk lists hold one value per assessed (probe) sample; they are empty on steps that reused an
    earlier estimate without re-assessing it.

    Typed fields say how the release was made: ``batch_size``; ``estimate_seconds`` (None on steps without an
    estimate) and ``estimator_start`` (``"exact"``, ``"cold"``, ``"warm"``, ``"warm+extended"``, each suffixed
    ``"+float64"`` when a float32 estimate was retaken in float64, :meth:`GradientDefense.estimate`);
    ``risk_noise_model`` (``"full"``, or ``"floor_only"`` when the recorded risk leaves a placement's operator
    noise out); ``risk_estimate_failed`` (why no risk was recorded while the noise was released anyway);
    ``noise_parameters`` (a placement's per-probe draw parameters, e.g. ``{"band_pass_mu": [...]}``) and
    ``draw_seconds``; ``releases`` (the most releases any sample of the batch took part in, from sample ids
    or ``releases_per_sample``; 0 when not counted) and ``cumulative_predicted_psnr`` (per probe, over that
    many releases, Jacobian held: a lower bound on a moving model's cumulative risk); ``risk_prior``: the attacker prior the risk is priced under (``"iid"``, ``"data"``,
    ``"online"``); ``per_token_predicted_psnr``: token-id models (``embedding_module``), per probe and token, the
    predicted PSNR of that token's embedding (:func:`invdefend.risk.invloss_by_group`). ``extra`` is free-form: integrations annotate records there (Opacus's ``epsilon``).
    """

    kind: str
    step: int
    mechanism: str
    relative_energy: float
    budget: float
    refreshed: bool = False
    fallback: bool = False
    fallback_reason: str = ""
    predicted_psnr: list[float] = field(default_factory=list)
    leakage: list[float] = field(default_factory=list)
    undefended_predicted_psnr: list[float] = field(default_factory=list)
    cumulative_predicted_psnr: list[float] = field(default_factory=list)
    per_token_predicted_psnr: list[list[float]] = field(default_factory=list)
    releases: int = 0
    singular_values: list[float] = field(default_factory=list)
    sweeps: int = 0
    max_residual: float = 0.0
    target_reached: bool | None = None
    batch_size: int = 0
    estimate_seconds: float | None = None
    estimator_start: str = ""
    risk_noise_model: str = "full"
    risk_prior: str = "iid"
    risk_estimate_failed: str = ""
    noise_parameters: dict[str, list[float]] = field(default_factory=dict)
    draw_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def format_refreshes(records: Iterable[ReleaseRecord]) -> str:
    """A text table of the risk at every spectrum refresh of ``records``: the probes' largest predicted PSNR
    undefended and defended, and the step's relative noise energy; then the mean of each over the refreshes.

    Lower PSNR means harder to reconstruct. Records without a risk estimate are skipped.
    """
    rows = [r for r in records if r.refreshed and r.predicted_psnr and r.undefended_predicted_psnr]
    lines = ["spectrum refreshes (probe samples, predicted PSNR in dB; lower = harder to reconstruct)",
             f"{'step':>5} {'undefended':>11} {'defended':>9} {'noise/‖g‖²':>11}"]
    lines += [f"{r.step:>5} {max(r.undefended_predicted_psnr):>11.2f} {max(r.predicted_psnr):>9.2f} "
              f"{r.relative_energy:>11.4f}" for r in rows]
    if rows:
        base = sum(max(r.undefended_predicted_psnr) for r in rows) / len(rows)
        defended = sum(max(r.predicted_psnr) for r in rows) / len(rows)
        lines.append(f"mean of the probes' max predicted PSNR: undefended {base:.2f} dB, defended {defended:.2f} dB")
    return "\n".join(lines)


def record_scalars(record: ReleaseRecord, tag: Callable[[str, str], str]) -> dict[str, float]:
    """The scalars of one release record worth logging every step, keyed by full tag.

    For loggers that take a flat ``{name: value}`` dict per step (Lightning's ``log_dict``, the Hugging
    Face Trainer's ``log``) rather than a ``SummaryWriter``. ``tag`` builds the full tag of a name for a
    kind, usually a monitor's :meth:`RiskMonitor.tag`. Always present: ``noise/relative_energy`` and
    ``fallback``; for each of ``predicted_psnr``, ``undefended_predicted_psnr`` and ``leakage`` that has a
    finite value, ``risk/<name>_max`` and ``risk/<name>_mean`` over its finite values — so risk statistics
    appear only on steps that re-estimated the spectrum (``record.refreshed``). Framework-free.
    """
    kind = record.kind
    out = {
        tag(kind, "noise/relative_energy"): float(record.relative_energy),
        tag(kind, "fallback"): float(record.fallback),
    }
    if record.releases:
        out[tag(kind, "releases/max_count")] = float(record.releases)
    for name, values in (("predicted_psnr", record.predicted_psnr),
                         ("undefended_predicted_psnr", record.undefended_predicted_psnr),
                         ("cumulative_predicted_psnr", record.cumulative_predicted_psnr),
                         ("leakage", record.leakage)):
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        if finite:
            out[tag(kind, f"risk/{name}_max")] = max(finite)
            out[tag(kind, f"risk/{name}_mean")] = sum(finite) / len(finite)
    return out


def hparam_values(settings: Any, **resolved: Any) -> dict[str, HParam]:
    """``settings`` (a dataclass such as :class:`~invdefend.defense.DefenseSettings`, or a mapping) with
    ``resolved`` values on top, keeping only what TensorBoard hparams can hold: ``str``, ``int``, ``float`` and
    ``bool`` (``None``, tensors, priors and dicts are left out)."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    else:
        values = dict(settings)
    values.update(resolved)
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}


def _as_image(sample: Tensor) -> Tensor:
    """One sample as a ``(C, H, W)`` float image with C in (1, 3): ``(H, W)`` gets one channel, other channel
    counts (and more dimensions) are stacked vertically, a flat vector is laid out on the smallest square."""
    t = sample.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        side = math.isqrt(max(t.numel() - 1, 0)) + 1
        return torch.cat([t, t.new_zeros(side * side - t.numel())]).reshape(1, side, side)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3 and t.shape[0] in (1, 3):
        return t
    return t.reshape(1, -1, t.shape[-1])


def probe_image(original: Tensor, reconstruction: Tensor, *, min_side: int = PROBE_IMAGE_SIDE) -> Tensor:
    """``original | reconstruction`` side by side as one ``(C, H, W)`` image in ``[0, 1]`` (C = 1 or 3), with a
    white separator, upscaled by nearest neighbour (a whole factor) until one sample's longer side reaches
    ``min_side``. Each input is one sample without a batch dimension, ``(C, H, W)``, ``(H, W)`` or flat
    ``(d,)`` (laid out on a square), in ``[0, 1]`` (values outside are clipped)."""
    a, b = _as_image(original), _as_image(reconstruction)
    if a.shape != b.shape:
        raise ValueError(f"invdefend.probe_image: original {tuple(a.shape)} and reconstruction {tuple(b.shape)} "
                         "differ in shape")
    factor = max(1, -(-int(min_side) // max(a.shape[1], a.shape[2])))
    gap = a.new_ones(a.shape[0], a.shape[1], 1)
    image = torch.cat([a, gap, b], dim=2).clamp(0.0, 1.0)
    return image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


class RiskMonitor:
    """Fans release records out to TensorBoard and callbacks.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar`` and
            ``add_histogram``); None for no TensorBoard.
        log_dir: open a ``SummaryWriter`` there when no writer is given.
        callbacks: callables receiving every :class:`ReleaseRecord`, in this order (see :meth:`subscribe`
            and :meth:`unsubscribe` to change them later).
        prefix: extra tag level after ``invdefend/`` (e.g. a run or client name); empty by default.
        max_history: :attr:`history` keeps only the latest this many records (default 1000), so that a long
            run's memory stays bounded; None keeps every record. TensorBoard and callbacks see all of them.
        hparams: write the defense's settings as TensorBoard hparams (:meth:`write_hparams`); False when the
            writer is shared with a framework that writes its own hparams session there (Lightning's
            TensorBoardLogger does), since a run holds one session and the last one written wins.
    """

    def __init__(
        self,
        writer: Any | None = None,
        *,
        log_dir: str | None = None,
        callbacks: Iterable[Callable[[ReleaseRecord], None]] = (),
        prefix: str = "",
        max_history: int | None = 1000,
        hparams: bool = True,
    ) -> None:
        if max_history is not None and (
            not isinstance(max_history, int) or isinstance(max_history, bool) or max_history < 0
        ):
            raise ValueError(
                f"invdefend.RiskMonitor: max_history={max_history!r} must be an integer >= 0, or None to keep "
                "every record"
            )
        if writer is None and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=log_dir)
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self.callbacks: list[Callable[[ReleaseRecord], None]] = list(callbacks)
        self.prefix = prefix.strip("/")
        self.history: list[ReleaseRecord] = []
        self.keep_history = True
        self.max_history = None if max_history is None else int(max_history)
        self.hparams = bool(hparams)
        self._last: dict[tuple[str, str], Any] = {}  # last value written per tag (for write-on-change)

    def subscribe(self, callback: Callable[[ReleaseRecord], None], *, first: bool = False) -> None:
        """Add a callback receiving every record.

        Callbacks run in order at every :meth:`emit`. By default ``callback`` runs after those already
        subscribed; ``first=True`` puts it before them (for a callback that must see, or annotate, a record
        before the others do).
        """
        if first:
            self.callbacks.insert(0, callback)
        else:
            self.callbacks.append(callback)

    def unsubscribe(self, callback: Callable[[ReleaseRecord], None]) -> None:
        """Remove a callback added by :meth:`subscribe` or passed as ``callbacks=`` at construction.

        Callbacks are matched by equality (so a bound method ``obj.method`` matches a fresh
        ``obj.method``); a callback subscribed twice is removed once (its first occurrence).

        Raises:
            ValueError: ``callback`` is not subscribed to this monitor.
        """
        try:
            self.callbacks.remove(callback)
        except ValueError:
            raise ValueError(
                f"invdefend.RiskMonitor.unsubscribe: {callback!r} is not subscribed to this monitor "
                f"({len(self.callbacks)} callback(s) are)"
            ) from None

    def tag(self, kind: str, name: str) -> str:
        """The full TensorBoard tag of ``name`` for ``kind``."""
        parts = [TAG_PREFIX, self.prefix, kind, name]
        return "/".join(p for p in parts if p)

    def emit(self, record: ReleaseRecord) -> None:
        """Log ``record`` everywhere."""
        if self.keep_history:
            self.history.append(record)
            if self.max_history is not None and len(self.history) > self.max_history:
                del self.history[: len(self.history) - self.max_history]
        if record.fallback_reason and record.refreshed:
            # Once per failed estimate (retries back off), not at every step released in fallback.
            if record.fallback:
                outcome = "released with conservative isotropic noise"
            elif record.mechanism == "monitor":
                outcome = "no noise added (monitor mode)"
            else:  # a mechanism whose noise needs no estimate (band_pass): only the risk record is lost
                outcome = f"released with {record.mechanism} noise; no risk recorded"
            logger.warning("invdefend.%s step %d: estimation failed (%s); %s",
                           record.kind, record.step, record.fallback_reason, outcome)
        if self.writer is not None:
            self._write(record)
        for cb in self.callbacks:
            cb(record)

    def _write_on_change(self, kind: str, name: str, value: float, step: int, force: bool) -> None:
        """Write ``value`` if it changed since the last write (or ``force``); ``_last`` holds (value, step)."""
        key = (kind, name)
        last = self._last.get(key)
        changed = last is None or last[0] != value
        if not (changed or force):
            return
        if last is not None and changed and last[1] < step - 1:
            self.writer.add_scalar(self.tag(kind, name), last[0], step - 1)  # hold the old value until now
        self.writer.add_scalar(self.tag(kind, name), value, step)
        self._last[key] = (value, step)

    def _write(self, r: ReleaseRecord) -> None:
        w, k, step = self.writer, r.kind, r.step
        w.add_scalar(self.tag(k, "noise/relative_energy"), r.relative_energy, step)
        self._write_on_change(k, "budget/relative_energy_target", float(r.budget), step, r.refreshed)
        self._write_on_change(k, "fallback", float(r.fallback), step, r.refreshed)
        if r.target_reached is not None and r.refreshed:
            w.add_scalar(self.tag(k, "risk/target_reached"), float(r.target_reached), step)
        if r.estimate_seconds is not None:
            w.add_scalar(self.tag(k, "estimator/seconds"), float(r.estimate_seconds), step)
        if r.releases:
            self._write_on_change(k, "releases/max_count", float(r.releases), step, r.refreshed)
        for name, values in (("predicted_psnr", r.predicted_psnr), ("leakage", r.leakage),
                             ("cumulative_predicted_psnr", r.cumulative_predicted_psnr)):
            for stat, value in finite_stats(values).items():
                w.add_scalar(self.tag(k, f"risk/{name}_{stat}"), value, step)
        und = finite_stats(r.undefended_predicted_psnr)
        for stat in ("mean", "max"):
            if stat in und:
                w.add_scalar(self.tag(k, f"risk/undefended_predicted_psnr_{stat}"), und[stat], step)
        if r.refreshed and not r.fallback_reason:
            w.add_scalar(self.tag(k, "estimator/max_residual"), r.max_residual, step)
            w.add_scalar(self.tag(k, "estimator/sweeps"), float(r.sweeps), step)
        sv = [v for v in r.singular_values if v > 0 and math.isfinite(v)]
        if sv:
            w.add_histogram(self.tag(k, "spectrum/log10_singular_values"), np.log10(np.asarray(sv)), step)

    def write_probe_image(self, kind: str, step: int, original: Tensor, reconstruction: Tensor, psnr: float,
                          ssim: float, seconds: float | None = None) -> None:
        """Write a probe and its reconstruction side by side (:func:`probe_image`; one sample each, no batch
        dimension, values in ``[0, 1]``) as the image ``probe/reconstruction``, and the scalars
        ``probe/attack_psnr``, ``probe/attack_ssim`` and (given) ``probe/attack_seconds``, at ``step``. No-op
        without a writer; a writer without ``add_image`` gets the scalars only."""
        w = self.writer
        if w is None:
            return
        if hasattr(w, "add_image"):
            w.add_image(self.tag(kind, "probe/reconstruction"), probe_image(original, reconstruction), step,
                        dataformats="CHW")
        w.add_scalar(self.tag(kind, "probe/attack_psnr"), float(psnr), step)
        w.add_scalar(self.tag(kind, "probe/attack_ssim"), float(ssim), step)
        if seconds is not None:
            w.add_scalar(self.tag(kind, "probe/attack_seconds"), float(seconds), step)

    def write_hparams(self, kind: str, settings: Mapping[str, Any], metrics: Iterable[str]) -> bool:
        """Write ``settings`` as TensorBoard hparams into this writer's own run directory (not the sub-run
        ``SummaryWriter.add_hparams`` makes), with ``metrics`` (names under ``kind``, e.g.
        ``"risk/predicted_psnr_max"``, tagged by :meth:`tag`) as the metrics the hparams dashboard shows.

        Values that are not ``str``/``int``/``float``/``bool`` are left out (:func:`hparam_values`); bools are
        stored as numbers 0/1. Returns whether anything was written: False without a writer, with one that
        has no ``file_writer`` (not a ``torch.utils.tensorboard.SummaryWriter``), or when the monitor was made
        with ``hparams=False``. One run holds one hparams
        session: a later call in the same run replaces what TensorBoard shows.
        """
        file_writer = getattr(self.writer, "file_writer", None)
        if file_writer is None or not self.hparams:
            return False
        from torch.utils.tensorboard.summary import hparams

        values = hparam_values(settings)
        metric_tags = {self.tag(kind, name): 0.0 for name in metrics}  # declares the tags; writes no values
        for summary in hparams(values, metric_tags):
            file_writer.add_summary(summary)
        return True

    def flush(self) -> None:
        """Flush the writer."""
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if this monitor opened it."""
        self.flush()
        if self._owns_writer and self.writer is not None:
            self.writer.close()
