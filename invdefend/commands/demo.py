"""``invdefend demo``: a private face rebuilt from its gradient, undefended, under the default defense and under
isotropic noise of equal energy (:mod:`invdefend.demo`)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .errors import choose_from, require, require_at_least

__all__ = ["QUICK", "add_parser", "run"]

#: What ``--quick`` changes: one fold instead of five, two faces attacked, shorter attacks.
QUICK: dict[str, int] = {"folds": 1, "faces": 2, "attack_iterations": 100, "restarts": 2}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    from ..demo import RUNS, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="rebuild held-out faces from their gradients, undefended and defended; picture, table, TensorBoard",
        description=(
            "Train a small face / non-face CNN on scikit-image's lfw_subset (ships with the install) undefended, "
            "with the default defense and with isotropic noise of the same energy (5-fold cross-validated "
            "accuracy, TensorBoard logs under --out); attack held-out faces' gradients with every attack of the "
            "suite, the defense-aware one with a face prior included; print a table and write <out>/faces.png, "
            "<out>/report.html and <out>/summary.json."
        ),
    )
    p.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="one fold instead of five, 2 faces, shorter attacks: under a minute (default: off)")
    p.add_argument("--budget", type=float, default=d.budget,
                   help="noise energy of both noisy runs relative to the mean gradient's, ||noise||^2/||g||^2 "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--faces", type=int, default=None, help=f"held-out faces attacked (default: {d.faces}; --quick: "
                                                           f"{QUICK['faces']})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, folds, batch order, probes, noise and attacks (default: %(default)s)")
    p.add_argument("--runs", default=",".join(d.runs),
                   help=f"comma-separated runs among {', '.join(RUNS)}; undefended is required (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads during the demo (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0."""
    from ..demo import RUNS, DemoConfig, run_demo

    require(math.isfinite(args.budget) and args.budget > 0,
            f"--budget must be a finite number > 0 (noise energy relative to the mean gradient's), got {args.budget}; "
            f"use e.g. --budget {DemoConfig.budget:g}")
    require_at_least(args.epochs, "--epochs", 1, example=str(DemoConfig.epochs))
    require_at_least(args.threads, "--threads", 1, example="1")
    runs = choose_from((r.strip() for r in args.runs.split(",") if r.strip()), RUNS, "--runs", args.runs)
    if "undefended" not in runs:
        runs.insert(0, "undefended")
    quick = dict(QUICK) if args.quick else {}
    if args.faces is not None:
        require_at_least(args.faces, "--faces", 1, example="4")
        quick["faces"] = args.faces
    config = DemoConfig(out=args.out, budget=args.budget, epochs=args.epochs, seed=args.seed, runs=tuple(runs),
                        threads=args.threads, **quick)
    run_demo(config)
    return 0
