"""Cold top-16 spectrum estimate vs building J and taking its SVD, on DLG's LeNet (32x32x3); tracking error.

    python benchmarks/estimator.py --quick

Prints a table, then one JSON line: ``speedup_vs_exact`` (median exact time / median cold estimate time per
sample, measured side by side in this process), ``max_rel_err_top16`` (largest relative error of the top-16
singular values against the exact SVD, over the samples), ``tracking_rel_err`` (warm-started estimate after
a few SGD steps, at most 2 sweeps, against the exact SVD of the moved model) and the settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from invdefend.data import natural_image_patches
from invdefend.jacobian import gradient_jacobian
from invdefend.models import LeNet, uniform_init_
from invdefend.spectral import topk_spectrum


def _rel_err(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((est - ref).abs() / ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 samples (default 4)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 leaves torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.samples or (2 if args.quick else 4)
    model = uniform_init_(LeNet(), generator=torch.Generator().manual_seed(0))
    x = natural_image_patches(n, seed=11)
    y = torch.arange(n) % 10
    # Warm-up: the first torch.func call of a process pays a one-time set-up; excluded from both timings.
    warm = gradient_jacobian(model, F.cross_entropy, x[:1], y[:1])
    warm.rmatvec(warm.matvec(torch.randn(1, warm.in_dim, 2)))

    exact_t, est_t, errs, sweeps = [], [], [], []
    for i in range(n):
        op = gradient_jacobian(model, F.cross_entropy, x[i : i + 1], y[i : i + 1])
        t0 = time.perf_counter()
        est = topk_spectrum(op, args.k, generator=torch.Generator().manual_seed(i))
        est_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        J = op.dense()
        s_exact = torch.linalg.svd(J, full_matrices=False).S
        exact_t.append(time.perf_counter() - t0)
        errs.append(_rel_err(est.singular_values[0], s_exact[0, : args.k]))
        sweeps.append(est.sweeps)
        print(f"sample {i}: estimate {est_t[-1]:.3f} s ({est.sweeps} sweeps), exact {exact_t[-1]:.2f} s, "
              f"max rel err top-{args.k} {errs[-1]:.2e}")

    # Tracking: a few SGD steps move the spectrum; a warm start with at most 2 sweeps follows it.
    before = topk_spectrum(gradient_jacobian(model, F.cross_entropy, x[:1], y[:1]), args.k)
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    batch = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch), torch.arange(8)).backward()
        opt.step()
    op = gradient_jacobian(model, F.cross_entropy, x[:1], y[:1])
    s_moved = torch.linalg.svdvals(op.dense())[0, : args.k]
    t0 = time.perf_counter()
    tracked = topk_spectrum(op, args.k, init=before, max_sweeps=2)
    track_t = time.perf_counter() - t0
    tracking_err = _rel_err(tracked.singular_values[0], s_moved)
    moved = _rel_err(before.singular_values[0], s_moved)
    print(f"tracking: spectrum moved {moved:.1%}; warm start {tracked.sweeps} sweeps, {track_t:.3f} s, "
          f"max rel err {tracking_err:.2e}")

    result = {
        "speedup_vs_exact": statistics.median(exact_t) / statistics.median(est_t),
        "max_rel_err_top16": max(errs),
        "tracking_rel_err": tracking_err,
        "tracking_sweeps": tracked.sweeps,
        "spectrum_moved_rel": moved,
        "estimate_seconds_median": statistics.median(est_t),
        "exact_seconds_median": statistics.median(exact_t),
        "cold_sweeps_max": max(sweeps),
        "k": args.k,
        "samples": n,
        "model": "LeNet-sigmoid width 12, uniform init, 32x32x3",
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
