"""Flower (flwr >= 1.41) client mods that enforce and record invdefend's protection of what a client sends.

A Flower mod wraps a ``ClientApp``: ``mod(msg, context, call_next) -> reply``. It sees the reply — the
model after local training, the embeddings of a query — not the training, so the noise is added where
it is defined, *inside* the client's training (:class:`~invdefend.defense.GradientDefense` on every
step's gradient, :class:`~invdefend.defense.EmbeddingDefense` on every embedding), and the mod
**enforces** that this happened and **records** the client's risk::

    app = ClientApp(mods=[GradientDefenseMod(log_dir="runs/flower")])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        defense = GradientDefense(model, criterion, budget=0.05, secure_rng=True)
        with record_releases(context, defense):                 # the ledger the mod checks
            optimizer = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
            ...                                                 # the usual loop
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

**The ledger.** :func:`record_releases` keeps, in ``context.state`` (records that never leave the node),
what happened inside its block: every optimizer step and whether a release that added noise preceded it,
every defense's risk record, a fingerprint of every defended parameter as the block closed, and a
fingerprint of every embedding row an attached ``EmbeddingDefense`` released.

**The train mod** (:class:`GradientDefenseMod`) checks, after the train function returns, that (1) every
optimizer step of the block followed a noised release (``mechanism="monitor"`` does not count unless
``allow_monitor``), and (2) every floating-point array of the reply that differs from the one received
is a defended parameter, bit for bit as it was when the block closed (so a BatchNorm running mean, which
is computed from the data without noise, is caught). **The query mod** (:class:`EmbeddingDefenseMod`)
checks that every row of every floating-point array of the reply is a row an attached EmbeddingDefense
released. On a violation both fail closed: ``on_violation="noise"`` (default) adds isotropic noise of
energy ``fallback_budget`` times the update's (per row for embeddings) and marks the reply,
``"refuse"`` replies with an error (``MOD_FAILED_PRECONDITION``), which strategies drop.

Both then write the client's risk into the reply's ``MetricRecord`` (keys ``invdefend.*``; use
:class:`RiskMetricsAggregation` on the server to keep the worst client rather than the average), log one
line per client and round on Flower's logger and, with ``log_dir``, write TensorBoard scalars under
``invdefend/client-<id>/<kind>/...`` with the server round as the step.

**Order with Flower's mods.** Flower runs ``mods=[a, b, c]`` outside-in: ``c`` is innermost and sees the
reply first. Put invdefend's mod *innermost*: ``mods=[secaggplus_mod, fixedclipping_mod,
GradientDefenseMod()]`` (or with ``LocalDpMod`` in place of the clipping mod). Clipping then scales the
already-noised update, which changes neither its signal-to-noise ratio nor the recorded risk
(post-processing), and a fail-closed noise is added *before* the clip, so the clipping norm that central
DP's sensitivity relies on still bounds what is sent; Secure Aggregation must be outermost because it
masks (and quantises) the final vector, and nothing may change it afterwards.

What the mods cannot see: that the defended model is trained on the data you think it is, or noise that
a defense promised but a buggy training loop removed after the block. The parameter fingerprints tie
the reply to the defended model's state when the block closed, no further.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
import math
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from invdefend.defense import DefendedOptimizer, EmbeddingDefense, GradientDefense
from invdefend.noise import NoiseSource, make_noise_source
from invdefend.monitor import ReleaseRecord, RiskMonitor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flwr.app import Context, Message, MetricRecord, RecordDict

__all__ = [
    "LEDGER_KEY",
    "METRIC_PREFIX",
    "ReleaseLedger",
    "record_releases",
    "RoundRisk",
    "GradientDefenseMod",
    "EmbeddingDefenseMod",
    "RiskMetricsAggregation",
]

LEDGER_KEY = "invdefend.ledger"
METRIC_PREFIX = "invdefend."
OnViolation = Literal["noise", "refuse"]
_flwr_log = logging.getLogger("flwr")  # Flower's own logger: shown in simulation and deployment output
_KINDS = ("gradient", "embedding")
_LISTS = ("relative-energy", "budget", "predicted-psnr", "undefended-predicted-psnr", "leakage")


def _digest(array: np.ndarray) -> str:
    """Fingerprint of an array's float32 values and shape (widening casts keep it; any change breaks it)."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(a.tobytes() + repr(a.shape).encode(), digest_size=16).hexdigest()


def _row_digests(array: np.ndarray) -> list[str]:
    """One fingerprint per row (first axis) of ``array``."""
    a = np.asarray(array)
    rows = a.reshape(a.shape[0], -1) if a.ndim > 0 else a.reshape(1, 1)
    return [_digest(r) for r in rows]


# ---------------------------------------------------------------------------------------------------------
# The ledger: what happened inside the client's training, kept in Context.state
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ReleaseLedger:
    """What one or more :func:`record_releases` blocks of the current message saw.

    Steps: ``protected_steps`` followed a release that added noise; ``monitor_steps`` followed only
    ``mechanism="monitor"`` releases (no noise); ``unprotected_steps`` followed no release at all.
    Per kind (``"gradient"``, ``"embedding"``): release and fail-closed counts and per-release lists
    (``relative-energy``, ``budget``) and per-sample risk lists (``predicted-psnr`` …).
    """

    open: bool = False
    blocks: int = 0
    protected_steps: int = 0
    monitor_steps: int = 0
    unprotected_steps: int = 0
    releases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0))
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0))
    values: dict[str, list[float]] = field(default_factory=dict)
    param_digests: list[str] = field(default_factory=list)
    row_digests: list[str] = field(default_factory=list)
    monitor_row_digests: list[str] = field(default_factory=list)
    _pending: bool | None = None  # since the last optimizer step: None nothing, True noised, False monitor only
    _depth: int = 0  # nesting of optimizer steps (a wrapper's step calling its inner optimizer's)

    def series(self, kind: str, name: str) -> list[float]:
        """The list ``name`` (one of ``relative-energy``, ``budget``, ``predicted-psnr``, …) for ``kind``."""
        return self.values.setdefault(f"{kind}-{name}", [])

    # -- events ----------------------------------------------------------------------------------------
    def on_release(self, record: ReleaseRecord) -> None:
        """A defense released something (subscribed to its monitor)."""
        kind = record.kind if record.kind in _KINDS else "gradient"
        self.releases[kind] += 1
        self.fallbacks[kind] += int(record.fallback)
        self.series(kind, "relative-energy").append(float(record.relative_energy))
        self.series(kind, "budget").append(float(record.budget))
        self.series(kind, "predicted-psnr").extend(float(v) for v in record.predicted_psnr)
        self.series(kind, "undefended-predicted-psnr").extend(float(v) for v in record.undefended_predicted_psnr)
        self.series(kind, "leakage").extend(float(v) for v in record.leakage)
        if kind == "gradient":
            noised = record.mechanism != "monitor"
            self._pending = noised or bool(self._pending)

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Global optimizer step pre-hook: classify the outermost step by what was released since the last."""
        if isinstance(optimizer, DefendedOptimizer):
            return  # its inner optimizer's step is the one that counts (after protect())
        self._depth += 1
        if self._depth > 1:
            return  # a wrapper (e.g. a DP optimizer) stepping its inner optimizer: one step, counted once
        if self._pending is None:
            self.unprotected_steps += 1
        elif self._pending:
            self.protected_steps += 1
        else:
            self.monitor_steps += 1
        self._pending = None

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Global optimizer step post-hook: close the step opened by :meth:`on_optimizer_step`."""
        if not isinstance(optimizer, DefendedOptimizer):
            self._depth = max(self._depth - 1, 0)

    # -- storage in Context.state -----------------------------------------------------------------------
    def merge(self, other: "ReleaseLedger") -> "ReleaseLedger":
        """This ledger plus ``other`` (two blocks in one message)."""
        out = ReleaseLedger(open=self.open or other.open, blocks=self.blocks + other.blocks)
        out.protected_steps = self.protected_steps + other.protected_steps
        out.monitor_steps = self.monitor_steps + other.monitor_steps
        out.unprotected_steps = self.unprotected_steps + other.unprotected_steps
        for k in _KINDS:
            out.releases[k] = self.releases[k] + other.releases[k]
            out.fallbacks[k] = self.fallbacks[k] + other.fallbacks[k]
        for key in set(self.values) | set(other.values):
            out.values[key] = self.values.get(key, []) + other.values.get(key, [])
        out.param_digests = self.param_digests + other.param_digests
        out.row_digests = self.row_digests + other.row_digests
        out.monitor_row_digests = self.monitor_row_digests + other.monitor_row_digests
        return out

    def to_config_record(self) -> Any:
        """A ``flwr.app.ConfigRecord`` holding the ledger (for ``context.state``)."""
        from flwr.app import ConfigRecord

        data: dict[str, Any] = {
            "open": self.open,
            "blocks": self.blocks,
            "protected-steps": self.protected_steps,
            "monitor-steps": self.monitor_steps,
            "unprotected-steps": self.unprotected_steps,
            "param-digests": list(self.param_digests),
            "row-digests": list(self.row_digests),
            "monitor-row-digests": list(self.monitor_row_digests),
        }
        for k in _KINDS:
            data[f"{k}-releases"] = self.releases[k]
            data[f"{k}-fallbacks"] = self.fallbacks[k]
            for name in _LISTS:
                data[f"{k}-{name}"] = [float(v) for v in self.values.get(f"{k}-{name}", [])]
        return ConfigRecord(data)

    @classmethod
    def from_config_record(cls, record: Any) -> "ReleaseLedger":
        """Rebuild a ledger stored by :meth:`to_config_record`."""
        out = cls(open=bool(record["open"]), blocks=int(record["blocks"]))
        out.protected_steps = int(record["protected-steps"])
        out.monitor_steps = int(record["monitor-steps"])
        out.unprotected_steps = int(record["unprotected-steps"])
        out.param_digests = list(record["param-digests"])
        out.row_digests = list(record["row-digests"])
        out.monitor_row_digests = list(record["monitor-row-digests"])
        for k in _KINDS:
            out.releases[k] = int(record[f"{k}-releases"])
            out.fallbacks[k] = int(record[f"{k}-fallbacks"])
            for name in _LISTS:
                out.values[f"{k}-{name}"] = [float(v) for v in record[f"{k}-{name}"]]
        return out


def _row_hook(ledger: ReleaseLedger, defense: EmbeddingDefense) -> Callable[..., None]:
    """A forward hook, registered after the defense's own, fingerprinting the rows it released."""
    seen = {"step": defense.step}

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if defense.step == seen["step"]:
            return  # the defense did not release this output (its estimator's own calls, or inactive)
        seen["step"] = defense.step
        digests = _row_digests(output.detach().cpu().numpy())
        record = defense.last_record
        if record is not None and record.mechanism == "monitor":
            ledger.monitor_row_digests.extend(digests)
        else:
            ledger.row_digests.extend(digests)

    return hook


@contextmanager
def record_releases(context: "Context", *defenses: GradientDefense | EmbeddingDefense) -> Iterator[ReleaseLedger]:
    """Record what ``defenses`` release inside the block into ``context.state[LEDGER_KEY]``.

    For a :class:`GradientDefense`, every optimizer step taken in the block (any optimizer: a global
    step pre-hook) is classified by the release that preceded it, and the defended model's trainable
    parameters are fingerprinted when the block closes. An :class:`EmbeddingDefense` is attached for the
    block if it is not already, and every row it releases is fingerprinted. Run the training whose result
    the ``ClientApp`` sends, and only that, inside the block.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    if not defenses:
        raise ValueError(
            "invdefend.integrations.flower.record_releases: pass at least one GradientDefense or EmbeddingDefense"
        )
    ledger = ReleaseLedger(blocks=1)
    undo: list[Callable[[], None]] = []
    for defense in defenses:
        if not isinstance(defense, (GradientDefense, EmbeddingDefense)):
            raise TypeError(
                "invdefend.integrations.flower.record_releases: expected GradientDefense or EmbeddingDefense, "
                f"got {type(defense).__name__}"
            )
        defense.monitor.subscribe(ledger.on_release)
        undo.append(lambda monitor=defense.monitor: monitor.unsubscribe(ledger.on_release))
        if isinstance(defense, EmbeddingDefense):
            if not defense.attached:
                defense.attach()
                undo.append(defense.detach)
            handle = defense.bottom.register_forward_hook(_row_hook(ledger, defense))
            undo.append(handle.remove)
    step_handles = [register_optimizer_step_pre_hook(ledger.on_optimizer_step),
                    register_optimizer_step_post_hook(ledger.after_optimizer_step)]
    try:
        yield ledger
    finally:
        for handle in step_handles:
            handle.remove()
        for fn in reversed(undo):
            fn()
        for defense in defenses:
            if isinstance(defense, GradientDefense):
                ledger.param_digests.extend(
                    _digest(p.detach().cpu().numpy()) for p in defense.model.parameters() if p.requires_grad
                )
        if LEDGER_KEY in context.state:
            stored = ReleaseLedger.from_config_record(context.state[LEDGER_KEY])
            if stored.open:  # opened by a mod for this message: add to it
                ledger = stored.merge(ledger)
        context.state[LEDGER_KEY] = ledger.to_config_record()


# ---------------------------------------------------------------------------------------------------------
# Round summaries
# ---------------------------------------------------------------------------------------------------------
def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else float("nan")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class RoundRisk:
    """One client's protection and risk for one message (a training round or a query)."""

    kind: str
    client: int
    round: int
    releases: int
    fallback_releases: int
    protected_steps: int
    unprotected_steps: int
    relative_energy: float
    predicted_psnr_max: float
    predicted_psnr_mean: float
    undefended_predicted_psnr_max: float
    leakage_max: float
    mod_fallback: bool = False
    violation: str = ""
    rows: int = 0
    unverified_rows: int = 0
    ledger: ReleaseLedger | None = field(default=None, repr=False)

    @classmethod
    def from_ledger(cls, kind: str, client: int, round_: int, ledger: ReleaseLedger) -> "RoundRisk":
        """Summarise ``ledger`` for ``kind``."""
        return cls(
            kind=kind, client=client, round=round_,
            releases=ledger.releases[kind], fallback_releases=ledger.fallbacks[kind],
            protected_steps=ledger.protected_steps,
            unprotected_steps=ledger.unprotected_steps + ledger.monitor_steps,
            relative_energy=_mean(ledger.series(kind, "relative-energy")),
            predicted_psnr_max=_nanmax(ledger.series(kind, "predicted-psnr")),
            predicted_psnr_mean=_mean(ledger.series(kind, "predicted-psnr")),
            undefended_predicted_psnr_max=_nanmax(ledger.series(kind, "undefended-predicted-psnr")),
            leakage_max=_nanmax(ledger.series(kind, "leakage")),
            ledger=ledger,
        )

    def to_metrics(self) -> dict[str, int | float]:
        """The ``invdefend.*`` entries written into the reply's MetricRecord."""
        p = METRIC_PREFIX
        out: dict[str, int | float] = {
            f"{p}client-id": int(self.client), f"{p}round": int(self.round),
            f"{p}releases": int(self.releases), f"{p}fallback-releases": int(self.fallback_releases),
            f"{p}relative-energy": float(self.relative_energy),
            f"{p}predicted-psnr-max": float(self.predicted_psnr_max),
            f"{p}predicted-psnr-mean": float(self.predicted_psnr_mean),
            f"{p}undefended-predicted-psnr-max": float(self.undefended_predicted_psnr_max),
            f"{p}leakage-max": float(self.leakage_max),
            f"{p}mod-fallback": int(self.mod_fallback),
        }
        if self.kind == "gradient":
            out[f"{p}protected-steps"] = int(self.protected_steps)
            out[f"{p}unprotected-steps"] = int(self.unprotected_steps)
        else:
            out[f"{p}rows"] = int(self.rows)
            out[f"{p}unverified-rows"] = int(self.unverified_rows)
        return out

    def to_release_record(self) -> ReleaseRecord:
        """The round as a :class:`ReleaseRecord` (step = round) for a :class:`RiskMonitor`."""
        led = self.ledger or ReleaseLedger()
        return ReleaseRecord(
            kind=self.kind, step=self.round, mechanism="flower-round",
            relative_energy=self.relative_energy, budget=_mean(led.series(self.kind, "budget")),
            refreshed=False, fallback=self.mod_fallback or self.fallback_releases > 0,
            fallback_reason=self.violation,
            predicted_psnr=list(led.series(self.kind, "predicted-psnr")),
            leakage=list(led.series(self.kind, "leakage")),
            undefended_predicted_psnr=list(led.series(self.kind, "undefended-predicted-psnr")),
            extra={"client": self.client, "releases": self.releases},
        )

    def describe(self) -> str:
        """One log line."""
        head = (f"invdefend[{self.kind}] client {self.client} round {self.round}: predicted PSNR max "
                f"{self.predicted_psnr_max:.2f} dB (undefended {self.undefended_predicted_psnr_max:.2f} dB), "
                f"leakage max {self.leakage_max:.3f}, noise {self.relative_energy:.2%} of the signal energy")
        if self.kind == "gradient":
            head += f", {self.protected_steps}/{self.protected_steps + self.unprotected_steps} steps protected"
        else:
            head += f", {self.rows - self.unverified_rows}/{self.rows} rows protected"
        if self.fallback_releases:
            head += f", {self.fallback_releases} fail-closed release(s)"
        if self.violation:
            head += f"; VIOLATION ({'noised by the mod' if self.mod_fallback else 'refused'}): {self.violation}"
        return head


# ---------------------------------------------------------------------------------------------------------
# The mods
# ---------------------------------------------------------------------------------------------------------
class _DefenseMod(ABC):
    """What the train and query mods share: message routing, fail-closed policy, logging."""

    kind = "gradient"
    default_types: tuple[str, ...] = ("train",)

    def __init__(
        self,
        *,
        on_violation: OnViolation = "noise",
        fallback_budget: float = 1.0,
        allow_monitor: bool = False,
        message_types: Collection[str] | None = None,
        send_metrics: bool = True,
        log_dir: str | None = None,
        seed: int | None = None,
    ) -> None:
        name = type(self).__name__
        if on_violation not in ("noise", "refuse"):
            raise ValueError(
                f"invdefend.integrations.flower.{name}: on_violation={on_violation!r}; use 'noise' or 'refuse'"
            )
        if not math.isfinite(fallback_budget) or fallback_budget <= 0:
            raise ValueError(
                f"invdefend.integrations.flower.{name}: fallback_budget={fallback_budget!r} must be a finite relative "
                "noise energy > 0 (1.0 = noise as large as the update)"
            )
        self.on_violation = on_violation
        self.fallback_budget = float(fallback_budget)
        self.allow_monitor = allow_monitor
        self.message_types = tuple(message_types) if message_types is not None else self.default_types
        self.send_metrics = send_metrics
        self.log_dir = log_dir
        self.seed = seed
        self._noise: NoiseSource | None = None
        self.history: list[RoundRisk] = []

    # -- helpers ----------------------------------------------------------------------------------------
    def _handles(self, msg: "Message") -> bool:
        return msg.metadata.message_type.split(".")[0] in self.message_types

    def _noise_source(self) -> NoiseSource:
        """Secure noise by default: a seed shared by clients would let one regenerate another's noise."""
        if self._noise is None:
            secure = self.seed is None
            self._noise = make_noise_source(seed=self.seed, secure=secure)
        return self._noise

    @staticmethod
    def _client(context: "Context") -> int:
        pid = context.node_config.get("partition-id")
        if isinstance(pid, (int, float)) and not isinstance(pid, bool):
            return int(pid)
        return int(context.node_id) & 0x7FFFFFFFFFFFFFFF  # a MetricRecord int is a signed 64-bit integer

    @staticmethod
    def _round(msg: "Message", context: "Context") -> int:
        for record in msg.content.config_records.values():
            value = record.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0

    def __call__(
        self, msg: "Message", context: "Context", call_next: Callable[["Message", "Context"], "Message"]
    ) -> "Message":
        """Run the ClientApp with a fresh ledger, then enforce and record the protection of its reply."""
        if not self._handles(msg) or not msg.has_content():
            return call_next(msg, context)
        context.state[LEDGER_KEY] = ReleaseLedger(open=True).to_config_record()
        try:
            reply = call_next(msg, context)
            stored = context.state[LEDGER_KEY] if LEDGER_KEY in context.state else None
        finally:
            if LEDGER_KEY in context.state:
                del context.state[LEDGER_KEY]
        if reply.has_error():
            return reply
        ledger = ReleaseLedger.from_config_record(stored) if stored is not None else ReleaseLedger(open=True)
        risk = RoundRisk.from_ledger(self.kind, self._client(context), self._round(msg, context), ledger)
        violation = self._enforce(msg, reply, ledger, risk)
        if violation:
            risk.violation = violation
            if self.on_violation == "refuse":
                self._log(risk, logging.WARNING)
                return self._error_reply(msg, violation)
            risk.mod_fallback = True
            warnings.warn(f"invdefend.integrations.flower.{type(self).__name__}: {violation}; the mod added "
                          f"conservative noise (relative energy {self.fallback_budget})", RuntimeWarning, stacklevel=2)
        self._log(risk, logging.WARNING if violation else logging.INFO)
        if self.send_metrics:
            self._metric_record(reply).update(risk.to_metrics())
        return reply

    @abstractmethod
    def _enforce(self, msg: "Message", reply: "Message", ledger: ReleaseLedger, risk: RoundRisk) -> str:
        """Check the reply against the ledger; on a violation add noise (policy ``noise``) and say why."""

    def _error_reply(self, msg: "Message", reason: str) -> "Message":
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                             reason=f"invdefend refused to send an unprotected reply: {reason}"), reply_to=msg)

    @staticmethod
    def _metric_record(reply: "Message") -> "MetricRecord":
        """The reply's only MetricRecord (created as ``"metrics"`` if it has none)."""
        from flwr.app import MetricRecord

        records = reply.content.metric_records
        if len(records) == 0:
            reply.content["metrics"] = MetricRecord()
            return reply.content["metrics"]
        return next(iter(records.values()))

    def _log(self, risk: RoundRisk, level: int) -> None:
        self.history.append(risk)
        _flwr_log.log(level, risk.describe())
        if self.log_dir is not None:
            # One short-lived writer per message: simulation engines may rebuild the app (and this mod)
            # for every message, so a cached writer would leak a file handle per round.
            monitor = RiskMonitor(log_dir=self.log_dir, prefix=f"client-{risk.client}")
            monitor.keep_history = False
            try:
                monitor.emit(risk.to_release_record())
            finally:
                monitor.close()


def _float_arrays(record: Any) -> dict[str, np.ndarray]:
    """The floating-point arrays of an ArrayRecord, by name."""
    out = {}
    for name, array in record.items():
        a = array.numpy()
        if np.issubdtype(a.dtype, np.floating):
            out[name] = a
    return out


class GradientDefenseMod(_DefenseMod):
    """Train-message mod: the update a client sends must come out of protected steps (see module doc).

    Args:
        on_violation: ``"noise"`` (add isotropic noise of energy ``fallback_budget·‖Δ‖²`` to the update Δ,
            mark ``invdefend.mod-fallback = 1``, warn) or ``"refuse"`` (reply with an error).
        fallback_budget: relative energy of that noise (default 1.0: as large as the update).
        allow_monitor: accept steps whose only release was ``mechanism="monitor"`` (no noise).
        message_types: message categories handled (default ``("train",)``); others pass through.
        send_metrics: write the ``invdefend.*`` entries into the reply's MetricRecord.
        log_dir: TensorBoard directory; scalars under ``invdefend/client-<id>/gradient/...`` per round.
        seed: seed of the mod's own fallback noise (tests); default: ``os.urandom`` noise.
    """

    kind = "gradient"
    default_types = ("train",)

    def _enforce(self, msg: "Message", reply: "Message", ledger: ReleaseLedger, risk: RoundRisk) -> str:
        incoming = dict(msg.content.array_records.items())
        changed: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []
        for key, record in reply.content.array_records.items():
            source = incoming.get(key) or (next(iter(incoming.values())) if len(incoming) == 1 else None)
            before = _float_arrays(source) if source is not None else {}
            for name, after in _float_arrays(record).items():
                prev = before.get(name)
                if prev is None or prev.shape != after.shape or not np.array_equal(prev, after):
                    changed.append((key, name, after, prev))
        problems: list[str] = []
        if changed and not ledger.blocks:
            problems.append("the train function changed the model but ran no record_releases(context, defense) "
                            "block, so nothing shows that its update was protected")
        if ledger.unprotected_steps:
            problems.append(f"{ledger.unprotected_steps} optimizer step(s) followed no invdefend release "
                            "(wrap the optimizer with defense.wrap or call defense.protect() before each step)")
        if ledger.monitor_steps and not self.allow_monitor:
            problems.append(f"{ledger.monitor_steps} step(s) were released by a mechanism='monitor' defense, "
                            "which adds no noise (pass allow_monitor=True to accept)")
        allowed = set(ledger.param_digests)
        foreign = [name for _, name, after, _ in changed if _digest(after) not in allowed]
        if foreign and ledger.blocks:
            problems.append(f"{len(foreign)} changed array(s) are not parameters of a defended model as its "
                            f"record_releases block left them (e.g. {foreign[:3]}; BatchNorm statistics and "
                            "changes made after the block count)")
        if not problems:
            return ""
        reason = "; ".join(problems)
        if self.on_violation == "noise" and changed:
            self._noise_update(reply, changed)
        return reason

    def _noise_update(self, reply: "Message", changed: list[tuple[str, str, np.ndarray, np.ndarray | None]]) -> None:
        """Add isotropic noise of energy ``fallback_budget·‖Δ‖²`` over every changed array."""
        from flwr.app import Array, ArrayRecord

        deltas = [after.astype(np.float64) - (prev.astype(np.float64) if prev is not None else 0.0)
                  for _, _, after, prev in changed]
        n = sum(d.size for d in deltas)
        energy = float(sum(np.square(d).sum() for d in deltas))
        std = math.sqrt(self.fallback_budget * energy / max(n, 1))
        z = self._noise_source().normal((n,), torch.float64, torch.device("cpu")).numpy()
        noisy: dict[tuple[str, str], np.ndarray] = {}
        offset = 0
        for (key, name, after, _), d in zip(changed, deltas):
            piece = z[offset: offset + d.size].reshape(d.shape)
            noisy[(key, name)] = (after.astype(np.float64) + std * piece).astype(after.dtype)
            offset += d.size
        for key in {k for k, *_ in changed}:
            old = reply.content.array_records[key]
            reply.content[key] = ArrayRecord(
                {name: Array(noisy[(key, name)]) if (key, name) in noisy else arr for name, arr in old.items()}
            )


class EmbeddingDefenseMod(_DefenseMod):
    """Query-message mod (vertical FL): every embedding row a client sends must come out of an attached
    :class:`~invdefend.defense.EmbeddingDefense` inside :func:`record_releases` (see module doc).

    Args:
        array_keys: the reply's ArrayRecords holding embeddings (default: all of them; every
            floating-point array in them is checked row by row, the first axis indexing samples).
        on_violation: ``"noise"`` (per unverified row ``h``, isotropic noise of energy
            ``fallback_budget·‖h‖²``) or ``"refuse"``.
        fallback_budget, allow_monitor, message_types (default ``("query",)``), send_metrics, log_dir,
        seed: as for :class:`GradientDefenseMod`.
    """

    kind = "embedding"
    default_types = ("query",)

    def __init__(self, *, array_keys: Collection[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.array_keys = None if array_keys is None else tuple(array_keys)

    def _enforce(self, msg: "Message", reply: "Message", ledger: ReleaseLedger, risk: RoundRisk) -> str:
        from flwr.app import Array, ArrayRecord

        allowed = set(ledger.row_digests) | (set(ledger.monitor_row_digests) if self.allow_monitor else set())
        total = unverified = 0
        monitor_rows = set(ledger.monitor_row_digests)
        monitor_hits = 0
        for key, record in list(reply.content.array_records.items()):
            if self.array_keys is not None and key not in self.array_keys:
                continue
            replaced: dict[str, Any] = {}
            for name, arr in _float_arrays(record).items():
                digests = _row_digests(arr)
                bad = np.array([d not in allowed for d in digests], dtype=bool)
                monitor_hits += sum(d in monitor_rows for d in digests) if not self.allow_monitor else 0
                total += len(digests)
                unverified += int(bad.sum())
                if bad.any() and self.on_violation == "noise":
                    replaced[name] = Array(self._noise_rows(arr, bad))
            if replaced:
                reply.content[key] = ArrayRecord({n: replaced.get(n, a) for n, a in record.items()})
        risk.rows, risk.unverified_rows = total, unverified
        if not unverified:
            return ""
        why = " (released by a mechanism='monitor' defense, which adds no noise)" if monitor_hits else ""
        return (f"{unverified} of {total} embedding row(s) were not released by an attached EmbeddingDefense inside "
                f"record_releases{why}")

    def _noise_rows(self, arr: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """``arr`` with isotropic noise of energy ``fallback_budget·‖h‖²`` on each flagged row ``h``."""
        flat = (arr.reshape(arr.shape[0], -1) if arr.ndim > 0 else arr.reshape(1, 1)).astype(np.float64)
        dim = flat.shape[1]
        z = self._noise_source().normal((int(bad.sum()), dim), torch.float64, torch.device("cpu")).numpy()
        std = np.sqrt(self.fallback_budget * np.square(flat[bad]).sum(axis=1, keepdims=True) / dim)
        flat[bad] = flat[bad] + std * z
        return flat.reshape(arr.shape).astype(arr.dtype)


# ---------------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------------
_MAX_KEYS = ("predicted-psnr-max", "undefended-predicted-psnr-max", "leakage-max")
_SUM_KEYS = ("releases", "fallback-releases", "protected-steps", "unprotected-steps", "mod-fallback", "rows",
             "unverified-rows")


class RiskMetricsAggregation:
    """A ``train_metrics_aggr_fn`` (or ``evaluate``) for Flower strategies that keeps the worst client.

    Averaging predicted PSNR over clients would hide the most exposed one. This keeps Flower's weighted
    average (``aggregate_metricrecords``) for every non-``invdefend.*`` key and, for invdefend's keys,
    the maximum over clients of predicted PSNR and leakage, the sum of step/row/fallback counts, the mean
    relative noise energy and the number of clients; every client's entries are kept in :attr:`history`
    and logged on Flower's logger. Use ``FedAvg(train_metrics_aggr_fn=RiskMetricsAggregation())``.
    """

    def __init__(self, *, log: bool = True) -> None:
        self.log = log
        self.history: list[dict[str, float]] = []

    def __call__(self, records: list["RecordDict"], weighted_by_key: str) -> "MetricRecord":
        """Aggregate the replies' MetricRecords."""
        from flwr.app import MetricRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        stripped, rows = [], []
        for record in records:
            metrics = next(iter(record.metric_records.values()))
            rows.append({k[len(METRIC_PREFIX):]: v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)})
            stripped.append(RecordDict({"metrics": MetricRecord(
                {k: v for k, v in metrics.items() if not k.startswith(METRIC_PREFIX)})}))
        out = aggregate_metricrecords(stripped, weighted_by_key)
        rows = [r for r in rows if r]
        if not rows:
            return out
        for r in rows:
            self.history.append(dict(r))
            if self.log:
                _flwr_log.info(
                    "invdefend: client %s round %s: predicted PSNR max %.2f dB (undefended %.2f dB), leakage max %.3f",
                    r.get("client-id"), r.get("round"), r.get("predicted-psnr-max", float("nan")),
                    r.get("undefended-predicted-psnr-max", float("nan")), r.get("leakage-max", float("nan")),
                )
        for key in _MAX_KEYS:
            values = [float(r[key]) for r in rows if key in r]
            if values:
                out[METRIC_PREFIX + key] = _nanmax(values)
        for key in _SUM_KEYS:
            values = [int(r[key]) for r in rows if key in r]
            if values:
                out[METRIC_PREFIX + key] = sum(values)
        energy = [float(r["relative-energy"]) for r in rows if "relative-energy" in r]
        if energy:
            out[METRIC_PREFIX + "relative-energy"] = _mean(energy)
        out[METRIC_PREFIX + "clients"] = len(rows)
        return out
