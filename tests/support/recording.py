"""An optimizer that keeps what it was handed: the gradients a defense released (on ``pythonpath`` via setup.cfg)."""

from __future__ import annotations

import torch
from torch import Tensor


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps, at every step, a copy of each parameter's gradient (None for a parameter without
    one): what left the client. :meth:`flat` gives a step's gradients as one vector."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[Tensor | None]] = []

    def step(self, closure=None):  # type: ignore[override]
        self.seen.append([None if p.grad is None else p.grad.detach().clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)

    def flat(self, step: int) -> Tensor:
        """Step ``step``'s gradients, flat, in parameter order (every parameter must have had one)."""
        return torch.cat([g.reshape(-1) for g in self.seen[step]])
