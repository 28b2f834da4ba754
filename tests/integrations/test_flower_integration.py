"""Flower client mods, run through Flower itself: a real ``ClientApp`` with its mod chain, called with real
``Message``/``Context`` objects (as Flower's own mod tests do), Flower's ``fixedclipping_mod`` for the
order, and — in the slow tier — the example app on Flower's simulation engine (3 clients, ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import fixedclipping_mod  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from invdefend.data import digits_split  # noqa: E402
from invdefend.defense import EmbeddingDefense, GradientDefense  # noqa: E402
from invdefend.integrations.flower import (  # noqa: E402
    LEDGER_KEY,
    EmbeddingDefenseMod,
    GradientDefenseMod,
    RiskMetricsAggregation,
    record_releases,
)
from invdefend.models import MLP  # noqa: E402

STEPS, BATCH = 3, 8
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = digits_split(seed=0)
    return x[:64], y[:64]


def _net(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if batchnorm:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Linear(16, 10))
    return MLP(64, (16,), 10, activation="sigmoid")


def _context(pid: int = 0) -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


def _message(content: RecordDict, message_type: str, round_: int = 1) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{round_}", src_node_id=0, dst_node_id=11, reply_to_message_id="",
                        group_id=str(round_), created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(content=content, metadata=metadata)


def _train_message(model: nn.Module, round_: int = 1, **config: float) -> Message:
    return _message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                "config": ConfigRecord({"server-round": round_, **config})}), MessageType.TRAIN, round_)


def _client(mods: list, style: str, digits: tuple[torch.Tensor, torch.Tensor], sent: dict) -> ClientApp:
    """A ClientApp whose train function trains ``STEPS`` steps in one of several styles."""
    x, y = digits
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = _net(batchnorm=style == "batchnorm")
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        criterion = nn.CrossEntropyLoss()
        mechanism = "monitor" if style == "monitor" else "spectral"
        defense = GradientDefense(model, criterion, budget=0.05, k=4, probes=2, refresh_every=2, seed=0,
                                  mechanism=mechanism)
        plain = torch.optim.SGD(model.parameters(), lr=0.5)

        def loop(optimizer: torch.optim.Optimizer) -> None:
            for step in range(STEPS):
                optimizer.zero_grad()
                criterion(model(x[step * BATCH:(step + 1) * BATCH]), y[step * BATCH:(step + 1) * BATCH]).backward()
                optimizer.step()

        if style == "no-block":
            loop(plain)
        else:
            with record_releases(context, defense):
                loop(plain if style == "unwrapped" else defense.wrap(plain))
        if style == "changed-after":
            with torch.no_grad():
                next(model.parameters()).add_(0.01)
        sent["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": STEPS * BATCH})}), reply_to=msg)

    return app


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_a_protected_round_passes_unchanged_and_carries_the_clients_risk(digits) -> None:
    mod = GradientDefenseMod(seed=0)
    sent: dict = {}
    context = _context(pid=2)
    reply = _client([mod], "protected", digits, sent)(_train_message(_net(), round_=4), context)
    assert not reply.has_error()
    for name, arr in _arrays(reply).items():
        np.testing.assert_array_equal(arr, sent["state"][name].numpy())  # the mod did not touch the update
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == STEPS * BATCH
    assert metrics["invdefend.protected-steps"] == STEPS and metrics["invdefend.unprotected-steps"] == 0
    assert metrics["invdefend.mod-fallback"] == 0 and metrics["invdefend.releases"] == STEPS
    assert metrics["invdefend.client-id"] == 2 and metrics["invdefend.round"] == 4
    psnr, clean = metrics["invdefend.predicted-psnr-max"], metrics["invdefend.undefended-predicted-psnr-max"]
    assert np.isfinite(psnr) and psnr < clean  # the noise lowered the predicted reconstruction quality
    assert 0 < metrics["invdefend.relative-energy"] < 1
    assert LEDGER_KEY not in context.state  # the ledger is per message and is consumed by the mod
    assert mod.history[-1].client == 2 and mod.history[-1].protected_steps == STEPS


def test_an_unwrapped_optimizer_is_caught_and_the_mod_noises_the_update(digits) -> None:
    mod = GradientDefenseMod(seed=0, fallback_budget=0.5)
    sent: dict = {}
    start = _net()
    with pytest.warns(RuntimeWarning, match="optimizer step"):
        reply = _client([mod], "unwrapped", digits, sent)(_train_message(start), _context())
    got, before = _arrays(reply), start.state_dict()
    delta = np.concatenate([(sent["state"][k] - before[k]).numpy().ravel() for k in got])
    noise = np.concatenate([(got[k] - sent["state"][k].numpy()).ravel() for k in got])
    assert np.square(noise).sum() / np.square(delta).sum() == pytest.approx(0.5, rel=0.25)
    metrics = reply.content["metrics"]
    assert metrics["invdefend.unprotected-steps"] == STEPS and metrics["invdefend.mod-fallback"] == 1


@pytest.mark.parametrize(
    ("style", "reason"),
    [
        ("unwrapped", "optimizer step(s) followed no invdefend release"),
        ("no-block", "ran no record_releases"),
        ("monitor", "mechanism='monitor'"),
        ("changed-after", "not parameters of a defended model"),
        ("batchnorm", "not parameters of a defended model"),
    ],
)
def test_refuse_policy_replies_with_an_error_naming_the_violation(digits, style: str, reason: str) -> None:
    app = _client([GradientDefenseMod(on_violation="refuse")], style, digits, {})
    reply = app(_train_message(_net(style == "batchnorm")), _context())
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reason in reply.error.reason


def test_monitor_only_training_is_accepted_when_allowed(digits) -> None:
    app = _client([GradientDefenseMod(allow_monitor=True)], "monitor", digits, {})
    reply = app(_train_message(_net()), _context())
    assert not reply.has_error()
    assert reply.content["metrics"]["invdefend.relative-energy"] == 0.0


def test_inside_flowers_clipping_mod_the_update_is_verified_then_clipped(digits) -> None:
    """The documented order: invdefend innermost, Flower's clipping outside it."""
    start = _net()
    msg = _train_message(start, clipping_norm=1e-3)
    app = _client([fixedclipping_mod, GradientDefenseMod(on_violation="refuse")], "protected", digits, {})
    reply = app(msg, _context())
    assert not reply.has_error()
    before = start.state_dict()
    update = np.concatenate([(v - before[k].numpy()).ravel() for k, v in _arrays(reply).items()])
    assert np.linalg.norm(update) == pytest.approx(1e-3, rel=1e-3)  # clipped after invdefend verified it
    assert reply.content["metrics"]["invdefend.protected-steps"] == STEPS
    # The other order hands invdefend a clipped update it cannot match to the defended model: refused.
    wrong = _client([GradientDefenseMod(on_violation="refuse"), fixedclipping_mod], "protected", digits, {})
    refused = wrong(_train_message(start, clipping_norm=1e-3), _context())
    assert refused.has_error() and "not parameters of a defended model" in refused.error.reason


def test_messages_of_other_types_pass_through_untouched(digits) -> None:
    app = ClientApp(mods=[GradientDefenseMod()])

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 0.5})}), reply_to=msg)

    reply = app(_message(RecordDict({"arrays": ArrayRecord(_net().state_dict())}), MessageType.EVALUATE), _context())
    assert dict(reply.content["metrics"]) == {"num-examples": 1, "accuracy": 0.5}


def _query_app(
    mods: list, bottom: nn.Module, defense: EmbeddingDefense, x: torch.Tensor, protected: bool
) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if protected:
            with record_releases(context, defense):
                h = bottom(x)
        else:
            with torch.no_grad():
                h = bottom(x)  # no defense attached: clean embeddings
        return Message(RecordDict({"embeddings": ArrayRecord({"h": Array(h.detach().numpy())})}), reply_to=msg)

    return app


def test_query_mod_passes_defended_embeddings_and_reports_per_sample_risk(digits) -> None:
    x = digits[0][:12]
    bottom = MLP(64, (32,), 8, activation="sigmoid", final_activation=True)
    defense = EmbeddingDefense(bottom, budget=0.2, seed=0)
    reply = _query_app([EmbeddingDefenseMod(seed=0)], bottom, defense, x, protected=True)(
        _message(RecordDict({"config": ConfigRecord({"server-round": 1})}), MessageType.QUERY), _context())
    h = reply.content["embeddings"]["h"].numpy()
    clean = bottom(x).detach().numpy()
    assert not defense.attached  # record_releases attached it for the block only
    assert not np.allclose(h, clean)  # what left is the defended embedding
    metrics = reply.content["metrics"]
    assert metrics["invdefend.rows"] == 12 and metrics["invdefend.unverified-rows"] == 0
    assert metrics["invdefend.mod-fallback"] == 0
    assert metrics["invdefend.predicted-psnr-max"] < metrics["invdefend.undefended-predicted-psnr-max"]


def test_query_mod_noises_rows_that_no_defense_released(digits) -> None:
    x = digits[0][:40]
    bottom = MLP(64, (32,), 8, activation="sigmoid", final_activation=True)
    defense = EmbeddingDefense(bottom, budget=0.2, seed=0)
    query = _message(RecordDict({"config": ConfigRecord({"server-round": 1})}), MessageType.QUERY)
    with pytest.warns(RuntimeWarning, match="not released by an attached EmbeddingDefense"):
        app = _query_app([EmbeddingDefenseMod(seed=0, fallback_budget=1.0)], bottom, defense, x, protected=False)
        reply = app(query, _context())
    clean = bottom(x).detach().numpy().astype(np.float64)
    h = reply.content["embeddings"]["h"].numpy().astype(np.float64)
    ratio = np.square(h - clean).sum() / np.square(clean).sum()
    assert ratio == pytest.approx(1.0, rel=0.3)
    assert reply.content["metrics"]["invdefend.unverified-rows"] == 40
    refusing = _query_app([EmbeddingDefenseMod(on_violation="refuse")], bottom, defense, x, protected=False)
    refused = refusing(query, _context())
    assert refused.has_error() and "40 of 40 embedding row(s)" in refused.error.reason


def test_risk_aggregation_keeps_the_worst_client_and_flowers_average_for_the_rest() -> None:
    def reply(psnr: float, steps: int, n: int, loss: float) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({
            "num-examples": n, "train-loss": loss, "invdefend.predicted-psnr-max": psnr,
            "invdefend.undefended-predicted-psnr-max": psnr + 10, "invdefend.leakage-max": psnr / 100,
            "invdefend.protected-steps": steps, "invdefend.unprotected-steps": 0, "invdefend.relative-energy": 0.05,
            "invdefend.client-id": steps, "invdefend.round": 1})})

    agg = RiskMetricsAggregation(log=False)
    out = agg([reply(12.0, 3, 10, 1.0), reply(20.0, 4, 30, 2.0), reply(float("nan"), 5, 60, 0.5)], "num-examples")
    assert out["invdefend.predicted-psnr-max"] == 20.0  # the worst client, not the mean
    assert out["invdefend.protected-steps"] == 12 and out["invdefend.clients"] == 3
    assert out["train-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0 + 60 * 0.5) / 100)
    assert [row["client-id"] for row in agg.history] == [3, 4, 5]


class _SteppingWrapper(torch.optim.Optimizer):
    """An optimizer whose step() steps another one (like a DP optimizer): both fire the global step hooks."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__([p for g in inner.param_groups for p in g["params"]], {})
        self.inner = inner

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return self.inner.step()


def test_a_wrapper_stepping_an_inner_optimizer_is_one_step(digits) -> None:
    x, y = digits
    model, criterion = _net(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, criterion, budget=0.05, k=4, probes=2, seed=0)
    wrapper = _SteppingWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    context = _context()
    with record_releases(context, defense) as ledger:
        protected = defense.wrap(wrapper)
        for optimizer in (protected, protected, wrapper):  # two protected steps, then one without protect()
            optimizer.zero_grad()
            criterion(model(x[:BATCH]), y[:BATCH]).backward()
            optimizer.step()
    assert (ledger.protected_steps, ledger.unprotected_steps) == (2, 1)
    assert context.state[LEDGER_KEY]["unprotected-steps"] == 1


def test_record_releases_rejects_non_defenses() -> None:
    with pytest.raises(ValueError, match="at least one"):
        with record_releases(_context()):
            pass
    with pytest.raises(TypeError, match="GradientDefense or EmbeddingDefense"):
        with record_releases(_context(), object()):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="on_violation"):
        GradientDefenseMod(on_violation="ignore")  # type: ignore[arg-type]


@pytest.mark.slow
def test_example_app_runs_three_clients_on_flowers_simulation_engine(tmp_path: Path) -> None:
    """The README example, shortened: Flower's ray simulation, 3 clients on digits partitions, 2 rounds."""
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "flower_app.py"), "--rounds", "2", "--log-dir", str(tmp_path / "tb"),
         "--summary", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads(out.read_text())
    rows = summary["clients"]
    assert sorted({(r["client-id"], r["round"]) for r in rows}) == [(c, r) for c in range(3) for r in (1, 2)]
    for r in rows:
        assert r["unprotected-steps"] == 0 and r["mod-fallback"] == 0 and r["protected-steps"] > 0
        assert r["predicted-psnr-max"] < r["undefended-predicted-psnr-max"]
    assert summary["accuracy"][-1] > 0.5
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "tb"))
    mux.Reload()
    tags = {t for run in mux.Runs().values() for t in run.get("scalars", [])}
    for client in range(3):
        assert f"invdefend/client-{client}/gradient/risk/predicted_psnr_max" in tags
