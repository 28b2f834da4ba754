"""invdefend.heap: while an estimate runs, glibc reuses freed memory instead of mapping fresh pages for every
large tensor; it leaves the allocator alone where the user tuned it or opted out, and restores it on exit.

Checked through glibc's own accounting (``mallinfo2().hblkhd``: bytes in mmap-ed blocks), in a fresh process
each (``tests/support/heap_probe.py``): a 64 MB tensor is a fresh mapping under glibc's defaults and comes
from the heap inside :func:`~invdefend.heap.reuse_freed_memory`."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from invdefend.heap import OPT_OUT_VARIABLE

PROBE = Path(__file__).resolve().parents[1] / "support" / "heap_probe.py"
TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
          OPT_OUT_VARIABLE)


def _has_mallinfo2() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" \
        and hasattr(ctypes.CDLL(None), "mallinfo2")


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in TUNING}
    out = subprocess.run([sys.executable, str(PROBE)], env={**clean, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default() -> dict:
    return _probe()


def test_inside_the_block_large_tensors_come_from_the_heap_and_the_default_is_restored_after(default: dict) -> None:
    assert default["before"]  # glibc's default: large blocks are mapped (and unmapped on free)
    assert default["active"] and not default["inside"]
    assert default["after"] and default["end"]  # restored


def test_nested_blocks_restore_only_at_the_outermost_exit(default: dict) -> None:
    assert not default["after_inner"]  # still held by the outer block


def test_the_estimator_runs_inside_the_block_and_gives_the_same_spectrum(default: dict) -> None:
    assert default["products_mapped"] and not any(default["products_mapped"])
    plain = _probe(**{OPT_OUT_VARIABLE: "0"})
    assert plain["products_mapped"] and all(plain["products_mapped"])
    assert plain["singular_values"] == default["singular_values"]  # bit-identical


@pytest.mark.parametrize("var,value", [(OPT_OUT_VARIABLE, "0"), ("MALLOC_MMAP_MAX_", "65536"),
                                       ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")])
def test_an_opt_out_or_the_users_own_malloc_tuning_leaves_the_allocator_alone(var: str, value: str) -> None:
    seen = _probe(**{var: value})
    assert not seen["active"] and seen["inside"] and seen["after_inner"]


def test_a_torch_distributed_process_leaves_the_allocator_alone() -> None:
    seen = _probe(HEAP_PROBE_DISTRIBUTED="1")
    assert seen["active"] and not seen["inside"]  # before the group: reuse acts
    assert not seen["distributed_active"] and seen["distributed_inside"]
