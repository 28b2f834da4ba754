"""Thread count for the whole test session, set on purpose.

torch's default (one intra-op thread per core) spin-waits on a shared 2-core machine: the suite took 10.5 min
with the default and 3.1 min with one thread. Every model here is small enough that one thread is the fast
choice; set ``INVDEFEND_TEST_THREADS`` to try another count. Multi-process tests (DDP, Flower) pin their own
workers' threads.
"""

from __future__ import annotations

import os

import torch

TEST_THREADS = int(os.environ.get("INVDEFEND_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
