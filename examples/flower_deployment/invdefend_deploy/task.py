"""The ClientApp's data and training loop: the logic of ``examples/flower_app.py``, sized by the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the SuperNode's ``--node-config``."""
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"invdefend_deploy: the SuperNode has no node config {err}; start each SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def partition(pid: int, num_partitions: int, samples: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``pid``'s share of the digits training split (a seeded shuffle dealt round-robin).

    ``samples > 0`` keeps only the first ``samples`` of the share (short runs, tests).
    """
    from invdefend.data import digits_split

    if not 0 <= pid < num_partitions:
        raise ValueError(f"invdefend_deploy: partition-id {pid} is outside 0..{num_partitions - 1}; "
                         "start each SuperNode with --node-config 'partition-id=<i> num-partitions=<n>'")
    x, y, _, _ = digits_split(seed=seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    idx = order[pid::num_partitions]
    if samples > 0:
        idx = idx[:samples]
    return x[idx], y[idx]


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    criterion: nn.Module,
) -> float:
    """Plain minibatch training; returns the mean training loss over every sample seen."""
    total, seen = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            optimizer.zero_grad()
            loss = criterion(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
    return total / max(seen, 1)
