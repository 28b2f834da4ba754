"""Risk-target mode over training: the noise the defense chooses, step by step, to hold the cumulative risk.

    python benchmarks/noise_schedule.py --quick      # 2 epochs (about a minute on one core)
    python benchmarks/noise_schedule.py              # 4 epochs

A ReLU LeNet learns which of the shipped photographs a 32×32 patch comes from (2000 left-half patches, Adam,
batch 32) under ``GradientDefense(target_psnr=T, prior=<Gaussian fitted on the training patches>,
floor=F)``: at every refresh the least shaped energy (prior-aware water-filling) that brings every probe's
**cumulative** predicted PSNR down to ``T``, the releases counted per sample id (``capture(x, y, ids=...)``).
The run writes a PNG (``--out``) with the relative noise energy per step and the probes' per-release and
cumulative predicted PSNR, and ends with one JSON line: the energy at the first and last refresh, its range,
how often the target was reached, the test accuracy, and the undefended accuracy beside it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# the accuracy study's training run (benchmarks/ is on sys.path when this script runs)
from prior_placements import train

from invdefend.data import photo_patches
from invdefend.prior import GaussianPrior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="default quick 2, full 4")
    parser.add_argument("--target-psnr", type=float, default=16.0)
    parser.add_argument("--floor", type=float, default=0.001, help="isotropic floor, relative energy")
    parser.add_argument("--max-budget", type=float, default=10.0)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("-k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="noise_schedule.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    epochs = args.epochs or (2 if args.quick else 4)
    x, y = photo_patches(2000, seed=args.seed, part="left")
    x_te, y_te = photo_patches(600, seed=args.seed + 11, part="right")
    prior = GaussianPrior.fit(x, 256)
    settings = {"target_psnr": args.target_psnr, "max_budget": args.max_budget, "floor": args.floor,
                "prior": prior, "k": args.k, "refresh_every": args.refresh_every}
    acc_plain, _ = train(x, y, x_te, y_te, epochs=epochs, seed=args.seed, settings=None)
    acc, records = train(x, y, x_te, y_te, epochs=epochs, seed=args.seed, settings=settings)
    energy = [r.budget for r in records]
    refreshes = [r for r in records if r.predicted_psnr]
    steps = [r.step for r in refreshes]
    per_release = [max(r.predicted_psnr) for r in refreshes]
    cumulative = [max(r.cumulative_predicted_psnr) if r.cumulative_predicted_psnr else float("nan")
                  for r in refreshes]
    reached = [bool(r.target_reached) for r in refreshes]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.semilogy([r.step for r in records], energy, lw=1)
    top.set_ylabel("noise energy / ‖ḡ‖²")
    top.set_title(f"Risk-target mode: cumulative predicted PSNR held at {args.target_psnr:g} dB\n"
                  f"(prior-aware water-filling + isotropic floor {args.floor:g}, ReLU LeNet, 32×32×3 photo patches)",
                  fontsize=10)
    bottom.plot(steps, per_release, ".-", label="per release (max over probes)")
    bottom.plot(steps, cumulative, ".-", label="cumulative over the releases so far")
    bottom.axhline(args.target_psnr, color="k", ls="--", lw=1, label="target")
    bottom.set_xlabel("step")
    bottom.set_ylabel("predicted PSNR (dB)")
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(json.dumps({
        "energy_first_refresh": round(refreshes[0].budget, 5), "energy_last_refresh": round(refreshes[-1].budget, 5),
        "energy_min": round(min(energy), 5), "energy_max": round(max(energy), 5),
        "target_reached_share": round(sum(reached) / len(reached), 3), "refreshes": len(refreshes),
        "max_releases": max(r.releases for r in records), "accuracy": round(acc, 4),
        "accuracy_undefended": round(acc_plain, 4), "target_psnr": args.target_psnr, "epochs": epochs,
        "plot": args.out, "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
