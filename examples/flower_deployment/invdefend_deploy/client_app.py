"""The ClientApp: local SGD on a digits partition under a GradientDefense, enforced by GradientDefenseMod.

The SuperNode says which partition it holds: ``flower-supernode --node-config 'partition-id=0
num-partitions=2'``. The run config's ``unprotected-partition`` makes that one partition train with a plain
optimizer (no defense) — a deliberate violation that the mod must catch and mark (``invdefend.mod-fallback``).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from invdefend.defense import GradientDefense
from invdefend.integrations.flower import GradientDefenseMod, record_releases
from invdefend.models import SmallCNN

from .task import node_partition, partition, train_local

# Innermost mod: with Flower's clipping or SecAgg+ mods, list them *before* this one.
app = ClientApp(mods=[GradientDefenseMod()])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; the reply carries the model and the number of examples."""
    torch.set_num_threads(1)
    cfg = context.run_config
    pid, n = node_partition(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    x, y = partition(pid, n, samples=int(cfg.get("samples-per-client", 0)))

    model = SmallCNN()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    criterion = nn.CrossEntropyLoss()
    secure = bool(cfg.get("secure-rng", False))
    noise: dict[str, Any] = {"secure_rng": True} if secure else {"seed": 1000 * server_round + pid}
    defense = GradientDefense(model, criterion, budget=float(cfg["budget"]), k=8, probes=2, refresh_every=5, **noise)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=0.9)
    protected = pid != int(cfg.get("unprotected-partition", -1))
    with record_releases(context, defense):
        loss = train_local(
            model, x, y, defense.wrap(optimizer) if protected else optimizer,
            epochs=int(cfg["local-epochs"]), batch_size=int(cfg.get("batch-size", 32)),
            generator=torch.Generator().manual_seed(100 * server_round + pid), criterion=criterion,
        )
    return Message(RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(x), "train-loss": loss}),
    }), reply_to=msg)
