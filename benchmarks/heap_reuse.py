"""What reusing freed memory during an estimate buys (``invdefend.heap``; docs/theory.md §10.4, item 4).

InvRE top-16 (top-k tail, one sample, one torch thread) on a model of ``benchmarks/scale.py``, alternately with
glibc's defaults (``INVDEFEND_HEAP_REUSE=0``) and with the library's default (freed memory reused), each run
in its own spawned process, ``--repeats`` pairs side by side. Reports wall and system seconds per run and
the ratios of the medians; the singular values must agree exactly.

    python benchmarks/heap_reuse.py                          # ResNet-18, 2 pairs (about 3 min)
    python benchmarks/heap_reuse.py --model resnet18_w16     # no difference: its blocks stay under 32 MB

The last line printed is one JSON object: ``reuse_over_default_wall``, ``reuse_over_default_sys`` and the
details.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

from scale import (  # benchmarks/ is on sys.path
    MODEL_NAMES,
    build_model,
    peak_gb,
    run_in_fresh_process,
)


def _invre(name: str, queue: Any) -> None:
    import torch
    from torch import nn

    from invdefend import InvRE
    from invdefend.heap import heap_reuse_available

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, make, extra = build_model(name)
    if extra:
        raise SystemExit(f"heap_reuse.py: {name} is a token-id model; pick one of the image models")
    model.eval()
    x, y = make(1)
    sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t0 = time.perf_counter()
    report = InvRE(model, nn.CrossEntropyLoss(), k=16, prior="iid", tail="topk").assess(x, y)
    queue.put({"seconds": time.perf_counter() - t0,
               "sys_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0,
               "peak_gb": peak_gb(), "reuse": heap_reuse_available(),
               "singular_values": report.singular_values[0]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[m for m in MODEL_NAMES if m != "text"], default="resnet18")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (default off, then on)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "reuse": []}
    for _ in range(args.repeats):
        for label, value in (("default", "0"), ("reuse", "1")):
            os.environ["INVDEFEND_HEAP_REUSE"] = value  # read by the spawned process
            out = run_in_fresh_process(_invre, args.model)
            runs[label].append(out)
            print(f"{label:>7}: {out['seconds']:.1f} s ({out['sys_seconds']:.1f} s system), "
                  f"peak {out['peak_gb']:.2f} GB, reuse active: {out['reuse']}", flush=True)
    if not all(r["reuse"] for r in runs["reuse"]) or any(r["reuse"] for r in runs["default"]):
        print("heap_reuse.py: memory reuse is not available here (not glibc, or malloc tuned by the "
              "environment): nothing to compare", file=sys.stderr)
    same = all(r["singular_values"] == runs["default"][0]["singular_values"]
               for r in runs["default"] + runs["reuse"])

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    result = {
        "model": args.model, "repeats": args.repeats, "threads": 1,
        "default_s": median("default", "seconds"), "reuse_s": median("reuse", "seconds"),
        "default_sys_s": median("default", "sys_seconds"), "reuse_sys_s": median("reuse", "sys_seconds"),
        "default_peak_gb": max(r["peak_gb"] for r in runs["default"]),
        "reuse_peak_gb": max(r["peak_gb"] for r in runs["reuse"]),
        "identical_singular_values": same,
    }
    result["reuse_over_default_wall"] = result["reuse_s"] / result["default_s"]
    result["reuse_over_default_sys"] = result["reuse_sys_s"] / max(result["default_sys_s"], 1e-9)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
