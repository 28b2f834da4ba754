"""Memory and time of InvRE and of the default defense on the models users train (issue 13).

Models (``invdefend.models``; random inputs of the right shape: time and memory do not depend on the data):

* ``resnet18`` — ResNet-18, CIFAR layout, BatchNorm, 11.2 M parameters, 3×32×32;
* ``resnet18_w16`` — the same layout at width 16 (0.7 M parameters);
* ``vit_tiny`` — ViT-Tiny's width (192, depth 12, 3 heads, 4×4 patches) on 3×32×32, 5.4 M parameters;
* ``text`` — a 2-layer stock ``nn.TransformerEncoder`` classifier on 32 token ids (vocabulary 1000, width
  128), defended through its embedding module (``embedding_module="embed"``).

Every figure is measured in its own spawned process on **one** torch thread, one after another (nothing else
runs beside it), and its peak memory is that process's peak resident set (``ru_maxrss``: Python, torch and
the model included).

* **InvRE** (``InvRE(model, loss, k=16, prior="iid")``, one sample): seconds per sample and peak memory,
  with the conservative top-k tail (``tail="topk"``) and with the default quadrature tail (``"slq"``: 4
  probes × 24 Lanczos steps on top of the top-16).
* **The default defense** (``GradientDefense(model, loss)``, its defaults; the BatchNorm layers train on
  batch statistics and are estimated with them held fixed, ``batch_norm="frozen"``), batch 32, SGD: plain
  steps and defended steps timed side by side in the process (median of ``--steps`` each, after one warm-up
  of each), the cold refresh (the defense's first step) and a warm refresh (its second estimate) timed
  apart. ``defended_over_plain`` is the first refresh period amortised, **cold refresh included**:
  ``(cold + (R − 1)·between) / (R·plain)`` with ``R = refresh_every = 100``;
  ``defended_over_plain_warm`` the later periods' ``(warm + (R − 1)·between) / (R·plain)``.

The last line printed is one JSON object: ``<model>_invre_peak_gb``, ``<model>_invre_s_per_sample`` (top-k
tail), ``<model>_invre_slq_s_per_sample``, ``<model>_defended_over_plain``, ``<model>_defense_peak_gb`` and
the details.

    python benchmarks/scale.py                       # every model (about 15 min on 2 cores)
    python benchmarks/scale.py --models resnet18_w16 text --steps 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from typing import Any

REFRESH_EVERY = 100
BATCH = 32
MODEL_NAMES = ("resnet18", "resnet18_w16", "vit_tiny", "text")


def build_model(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """The model, a batch-maker ``make(n) -> (inputs, targets)`` and the defense's extra arguments."""
    import torch

    from invdefend.models import ResNet18, TextTransformer, ViT

    gen = torch.Generator().manual_seed(0)
    if name == "text":
        model = TextTransformer()

        def make(n: int) -> tuple[Any, Any]:
            ids = torch.randint(0, 1000, (n, 32), generator=gen)
            return ids, torch.randint(0, 4, (n,), generator=gen)

        return model, make, {"embedding_module": "embed"}
    model = {"resnet18": lambda: ResNet18(width=64), "resnet18_w16": lambda: ResNet18(width=16),
             "vit_tiny": ViT}[name]()

    def make_images(n: int) -> tuple[Any, Any]:
        return torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    return model, make_images, {}


def peak_gb() -> float:
    """This process's peak resident memory in GB (``ru_maxrss``, kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def _invre(name: str, tail: str, queue: Any) -> None:
    import torch
    from torch import nn

    from invdefend import InvRE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, make, extra = build_model(name)
    model.eval()
    x, y = make(1)
    if "embedding_module" in extra:  # token ids: the estimate is taken on the embedding module's output
        from invdefend.invre import estimate_gradient_spectrum

        t0 = time.perf_counter()
        spec = estimate_gradient_spectrum(model, nn.CrossEntropyLoss(), x, y, k=16, tail=tail == "slq",
                                          embedding_module="embed", left=False)
        seconds = time.perf_counter() - t0
        sweeps = spec.sweeps
    else:
        t0 = time.perf_counter()
        report = InvRE(model, nn.CrossEntropyLoss(), k=16, prior="iid", tail=tail).assess(x, y)
        seconds = time.perf_counter() - t0
        sweeps = report.estimator.get("sweeps_max")
    queue.put({"seconds": seconds, "peak_gb": peak_gb(), "sweeps": sweeps,
               "parameters": sum(p.numel() for p in model.parameters())})


def _defense(name: str, steps: int, queue: Any) -> None:
    import copy

    import torch
    from torch import nn

    from invdefend import GradientDefense

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, make, extra = build_model(name)
    plain_model = copy.deepcopy(model)
    loss = nn.CrossEntropyLoss()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    defense = GradientDefense(model, loss, seed=0, **extra)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.01))
    batches = [make(BATCH) for _ in range(4)]

    def step(m: Any, o: Any, i: int) -> float:
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        o.zero_grad()
        loss(m(x), y).backward()
        o.step()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below through the records
        step(plain_model, plain_opt, 0)  # warm-up of the plain loop
        cold = step(model, opt, 0)  # the defense's first step: the cold refresh
        plain, between = [], []
        for i in range(steps):
            plain.append(step(plain_model, plain_opt, i + 1))
            between.append(step(model, opt, i + 1))
        defense.load_state_dict({**defense.state_dict(), "next_refresh": defense.step})  # refresh next (warm)
        warm = step(model, opt, steps + 1)
    records = defense.monitor.history
    refreshes = [r for r in records if r.refreshed]
    p = statistics.median(plain)
    b = statistics.median(between)
    R = REFRESH_EVERY
    queue.put({
        "plain_s": p, "between_s": b, "cold_refresh_s": cold, "warm_refresh_s": warm,
        "defended_over_plain": (cold + (R - 1) * b) / (R * p),
        "defended_over_plain_warm": (warm + (R - 1) * b) / (R * p),
        "between_over_plain": b / p,
        "peak_gb": peak_gb(),
        "fallback_steps": sum(r.fallback for r in records),
        "refreshes": len(refreshes),
        "refresh_starts": [r.estimator_start for r in refreshes],
        "refresh_sweeps": [r.sweeps for r in refreshes],
        "parameters": sum(q.numel() for q in model.parameters()),
    })


def run_in_fresh_process(target: Any, *args: Any) -> dict[str, Any]:
    """``target(*args, queue)`` in a spawned process (its own peak memory); returns what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--steps", type=int, default=5, help="plain and defended steps timed between refreshes")
    parser.add_argument("--skip-slq", action="store_true", help="do not time InvRE with the quadrature tail")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"threads": 1, "batch": BATCH, "refresh_every": REFRESH_EVERY, "details": {}}
    t_start = time.perf_counter()
    for name in args.models:
        inv = run_in_fresh_process(_invre, name, "topk")
        print(f"{name}: InvRE top-16 (top-k tail) {inv['seconds']:.1f} s/sample, peak {inv['peak_gb']:.2f} GB",
              flush=True)
        slq = None if args.skip_slq else run_in_fresh_process(_invre, name, "slq")
        if slq:
            print(f"{name}: InvRE top-16 + SLQ tail {slq['seconds']:.1f} s/sample, peak {slq['peak_gb']:.2f} GB",
                  flush=True)
        dfn = run_in_fresh_process(_defense, name, args.steps)
        print(f"{name}: defended/plain {dfn['defended_over_plain']:.2f} (cold refresh included; warm periods "
              f"{dfn['defended_over_plain_warm']:.2f}), plain step {dfn['plain_s']:.3f} s, cold refresh "
              f"{dfn['cold_refresh_s']:.1f} s, warm {dfn['warm_refresh_s']:.1f} s, peak {dfn['peak_gb']:.2f} GB, "
              f"fallback steps {dfn['fallback_steps']}", flush=True)
        out[f"{name}_invre_peak_gb"] = round(inv["peak_gb"], 3)
        out[f"{name}_invre_s_per_sample"] = round(inv["seconds"], 2)
        if slq:
            out[f"{name}_invre_slq_s_per_sample"] = round(slq["seconds"], 2)
            out[f"{name}_invre_slq_peak_gb"] = round(slq["peak_gb"], 3)
        out[f"{name}_defended_over_plain"] = round(dfn["defended_over_plain"], 3)
        out[f"{name}_defended_over_plain_warm"] = round(dfn["defended_over_plain_warm"], 3)
        out[f"{name}_defense_peak_gb"] = round(dfn["peak_gb"], 3)
        out["details"][name] = {"invre": inv, "invre_slq": slq, "defense": dfn}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
