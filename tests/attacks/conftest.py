"""Shared settings for the attack tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intraop_thread() -> Iterator[None]:
    """The attacked models are tiny: one intra-op thread is faster than two, and it keeps the runtime stable
    when other processes share the 2 CPU cores (oversubscribed OpenMP threads slowed an attack 30x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
