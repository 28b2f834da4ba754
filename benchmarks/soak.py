"""Soak test: thousands of defended training steps on digits, watching for NaN, memory growth and slowdown.

A small CNN is trained on scikit-learn's 8x8 digits with :class:`invdefend.GradientDefense` wrapped around
its optimizer (spectral mechanism, warm-started refreshes, default :class:`~invdefend.RiskMonitor` with its
bounded history). Every step checks the loss, the released gradient and the parameters for NaN/Inf.

Measured, in this one process:

* resident memory (``/proc/self/statm``; ``resource.getrusage`` where /proc is missing) after a warm-up of
  10 % of the steps and at the end: ``rss_growth_mb`` is the difference;
* step time: ``step_time_drift`` is the median step time over the last 10 % of the steps divided by the
  median over the first 10 % after the warm-up (refresh steps included in both, at the same rate), each
  normalised by a fixed reference workload timed right after every step (forward and backward of a never-updated,
  undefended copy of the initial model on a fixed batch). On a shared machine the speed of the CPU itself
  drifts by tens of percent within seconds; the reference cancels that, so the ratio shows what the
  defense adds. ``raw_step_time_drift`` (unnormalised), ``reference_drift`` (how much the machine itself
  drifted) and ``wall_step_time_drift`` are printed too. Times are this process's CPU time
  (``time.process_time``, one torch thread).

It ends with one JSON line: ``{"steps", "rss_growth_mb", "step_time_drift", ...}``; the exit status is 1
when a NaN/Inf appeared, the memory grew by more than ``--max-rss-growth-mb`` or the drift exceeded
``--max-drift``.

Usage::

    python benchmarks/soak.py                 # 2000 steps
    python benchmarks/soak.py --quick         # 200 steps, a smoke run
    python benchmarks/soak.py --steps 5000 --refresh-every 10
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
from torch import nn

from invdefend import GradientDefense, RiskMonitor
from invdefend.data import load_digits_tensors


def rss_mb() -> float:
    """Current resident set size in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # no /proc: peak RSS is the best portable proxy
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def small_cnn(seed: int) -> nn.Module:
    """A 2-conv CNN for 1x8x8 digits (1954 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="defended training steps (default 2000)")
    p.add_argument("--quick", action="store_true", help="200 steps, for a smoke run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--refresh-every", type=int, default=20)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    p.add_argument(
        "--max-history", type=int, default=1000,
        help="records RiskMonitor.history keeps (default 1000, the library's); -1 keeps all of them",
    )
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    p.add_argument("--max-drift", type=float, default=1.5)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 200
    if args.steps < 20:
        p.error("--steps must be >= 20 (the first and last 10 % are compared)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print the JSON summary line; returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = load_digits_tensors()
    model = small_cnn(args.seed)
    criterion = nn.CrossEntropyLoss()
    monitor = RiskMonitor(max_history=None if args.max_history < 0 else args.max_history)
    defense = GradientDefense(
        model, criterion, budget=args.budget, k=args.k, probes=args.probes, refresh_every=args.refresh_every,
        seed=args.seed, monitor=monitor,
    )
    optimizer = defense.wrap(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = copy.deepcopy(model)  # never updated: the same work at every step
    x_ref, y_ref = x[: args.batch_size], y[: args.batch_size]
    order = torch.Generator().manual_seed(args.seed)

    warmup = max(1, args.steps // 10)
    window = max(1, args.steps // 10)
    times: list[float] = []  # wall seconds per step
    cpu_times: list[float] = []  # this process's CPU seconds per step (less sensitive to other load)
    ref_times: list[float] = []  # CPU seconds of the fixed reference workload after each step
    refreshed: list[bool] = []
    rss_trace: list[float] = []
    non_finite = fallbacks = 0
    rss_start = rss_end = 0.0
    losses: list[float] = []
    t_total = time.perf_counter()
    for step in range(args.steps):
        if step == warmup:
            gc.collect()
            rss_start = rss_mb()
        idx = torch.randint(0, len(x), (args.batch_size,), generator=order)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        loss = criterion(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        cpu_times.append(time.process_time() - c0)
        times.append(time.perf_counter() - t0)
        c0 = time.process_time()
        reference.zero_grad(set_to_none=True)
        criterion(reference(x_ref), y_ref).backward()
        ref_times.append(time.process_time() - c0)
        if (step + 1) % window == 0:
            rss_trace.append(round(rss_mb(), 1))
        record = defense.last_record
        fallbacks += int(record is not None and record.fallback)
        refreshed.append(bool(record is not None and record.refreshed))
        loss_value = float(loss.detach())
        finite = math.isfinite(loss_value) and all(
            bool(torch.isfinite(p).all()) and (p.grad is None or bool(torch.isfinite(p.grad).all())) for p in params
        )
        non_finite += int(not finite)
        losses.append(loss_value)
    gc.collect()
    rss_end = rss_mb()
    wall = time.perf_counter() - t_total

    first = cpu_times[warmup : warmup + window]
    last = cpu_times[-window:]
    raw_drift = statistics.median(last) / statistics.median(first)
    ref_drift = statistics.median(ref_times[-window:]) / statistics.median(ref_times[warmup : warmup + window])
    drift = raw_drift / ref_drift
    wall_drift = statistics.median(times[-window:]) / statistics.median(times[warmup : warmup + window])
    refresh_first = [t for t, r in zip(first, refreshed[warmup : warmup + window]) if r]
    refresh_last = [t for t, r in zip(last, refreshed[-window:]) if r]
    growth = rss_end - rss_start
    head = statistics.fmean(losses[:window])
    tail = statistics.fmean(losses[-window:])
    ok = non_finite == 0 and growth <= args.max_rss_growth_mb and drift <= args.max_drift
    summary = {
        "steps": args.steps,
        "rss_growth_mb": round(growth, 2),
        "step_time_drift": round(drift, 3),
        "raw_step_time_drift": round(raw_drift, 3),
        "reference_drift": round(ref_drift, 3),
        "wall_step_time_drift": round(wall_drift, 3),
        "non_finite_steps": non_finite,
        "fallback_steps": fallbacks,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_trace_mb": rss_trace,
        "median_step_ms_first": round(1e3 * statistics.median(first), 2),
        "median_step_ms_last": round(1e3 * statistics.median(last), 2),
        "median_refresh_ms_first": round(1e3 * statistics.median(refresh_first), 2) if refresh_first else None,
        "median_refresh_ms_last": round(1e3 * statistics.median(refresh_last), 2) if refresh_last else None,
        "loss_first": round(head, 4),
        "loss_last": round(tail, 4),
        "history_len": len(defense.monitor.history),
        "batch_size": args.batch_size,
        "refresh_every": args.refresh_every,
        "wall_s": round(wall, 1),
        "ok": ok,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
