"""Run in a fresh process by tests/core/test_heap.py: whether tensors of 64 MB and more are fresh mappings (glibc's
default for large blocks) outside, inside and after :func:`invdefend.heap.reuse_freed_memory`, nested, and
inside every product of an estimate. Prints one JSON object.

A fresh process, because a long one's heap may hold a 64 MB hole from earlier work that glibc would reuse
whatever its settings."""

from __future__ import annotations

import ctypes
import json
import os
import tempfile

import torch
from torch import nn

from invdefend.heap import reuse_freed_memory
from invdefend.jacobian import gradient_jacobian
from invdefend.spectral import topk_spectrum

BIG = 16 * 2**20  # float32 elements: 64 MB, above glibc's largest mmap threshold (32 MB)


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


LIBC = ctypes.CDLL(None)
LIBC.mallinfo2.restype = MallInfo2


def big_tensor_is_mapped(scale: int = 1) -> bool:
    """Whether a fresh tensor of ``scale`` × 64 MB is served by its own mmap. Checks after a block use a size
    larger than any free chunk the heap can hold by then (4×, 8×): glibc fills a request from a free heap chunk
    that fits before it maps, whatever its settings."""
    before = LIBC.mallinfo2().hblkhd
    t = torch.empty(BIG * scale)
    mapped = LIBC.mallinfo2().hblkhd - before >= t.numel() * t.element_size()
    del t
    return mapped


def main() -> None:
    seen: dict[str, object] = {"before": big_tensor_is_mapped()}
    with reuse_freed_memory() as active:
        seen["active"] = active
        seen["inside"] = big_tensor_is_mapped()
        with reuse_freed_memory():
            pass
        seen["after_inner"] = big_tensor_is_mapped()
    seen["after"] = big_tensor_is_mapped(4)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    op = gradient_jacobian(model, nn.CrossEntropyLoss(), torch.rand(2, 12), torch.tensor([0, 2]))
    products: list[bool] = []
    matvec = op.matvec

    def probing(V: torch.Tensor) -> torch.Tensor:
        products.append(big_tensor_is_mapped())
        return matvec(V)

    op.matvec = probing  # type: ignore[method-assign]
    spec = topk_spectrum(op, 3, oversample=2, generator=torch.Generator().manual_seed(0))
    seen["products_mapped"] = products
    seen["singular_values"] = spec.singular_values.tolist()
    seen["end"] = big_tensor_is_mapped(8)
    if os.environ.get("HEAP_PROBE_DISTRIBUTED") == "1":  # a one-process gloo group: reuse must stay off
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
        with reuse_freed_memory() as active:
            seen["distributed_active"] = active
            seen["distributed_inside"] = big_tensor_is_mapped(16)
        dist.destroy_process_group()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
