"""The ServerApp: FedAvg over the SuperNodes, the worst client's risk kept, every train reply recorded.

The record (JSON, at the run config's ``out``) holds one entry per train reply the server received: the
round, the sending node, its error if it is one, the ``invdefend.*`` metrics that
:class:`~invdefend.integrations.flower.GradientDefenseMod` wrote on the client, and whether its arrays
differ from the ones the server sent. It is rewritten after every round, and ``finished`` is set last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from invdefend.integrations.flower import METRIC_PREFIX, RiskMetricsAggregation
from invdefend.models import SmallCNN

app = ServerApp()


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _max_abs_change(sent: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> float | None:
    """Largest absolute change of any array, or None if the names or shapes do not match."""
    if sent.keys() != received.keys() or any(sent[k].shape != received[k].shape for k in sent):
        return None
    diffs = [float(np.max(np.abs(received[k].astype(np.float64) - sent[k].astype(np.float64))))
             for k in sent if sent[k].size]
    return max(diffs, default=0.0)


class RecordingFedAvg(FedAvg):
    """FedAvg that writes a JSON record of every train reply before aggregating it."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.record: dict[str, Any] = {"replies": [], "rounds": {}, "finished": False}
        self._sent: dict[int, dict[str, np.ndarray]] = {}
        self._started = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember what is sent this round, then sample and configure as FedAvg does."""
        self._sent[server_round] = {k: v.copy() for k, v in _arrays(arrays).items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every reply as received, then aggregate as FedAvg does."""
        replies = list(replies)
        sent = self._sent.get(server_round, {})
        for msg in replies:
            entry: dict[str, Any] = {"round": server_round, "node-id": int(msg.metadata.src_node_id)}
            if msg.has_error():
                entry["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
            else:
                metrics: dict[str, Any] = {}
                for record in msg.content.metric_records.values():
                    metrics.update(record)
                entry["invdefend"] = {k: v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
                entry["num-examples"] = metrics.get(self.weighted_by_key)
                received = {}
                for array_record in msg.content.array_records.values():
                    received.update(_arrays(array_record))
                change = _max_abs_change(sent, received)
                entry["arrays-max-abs-change"] = change
                entry["arrays-differ"] = change is None or change > 0.0
            self.record["replies"].append(entry)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.record["rounds"][str(server_round)] = {
            "replies": len(replies), "aggregated": dict(metrics) if metrics is not None else None,
        }
        self.write()
        return arrays, metrics

    def write(self) -> None:
        """Write the record (atomically: a reader never sees half a file)."""
        self.record["wall-s"] = round(time.perf_counter() - self._started, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, allow_nan=True))
        tmp.replace(self.out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedAvg on ``min-nodes`` SuperNodes and record every train reply."""
    cfg = context.run_config
    torch.manual_seed(0)
    nodes = int(cfg["min-nodes"])
    strategy = RecordingFedAvg(
        out=Path(str(cfg["out"])).expanduser(),
        fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes,
        train_metrics_aggr_fn=RiskMetricsAggregation(),
    )
    strategy.write()  # an empty record now: the run started
    strategy.start(grid=grid, initial_arrays=ArrayRecord(SmallCNN().state_dict()),
                   num_rounds=int(cfg["num-server-rounds"]), timeout=600.0)
    strategy.record["finished"] = True
    strategy.write()
