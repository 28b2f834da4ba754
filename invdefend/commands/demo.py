"""``invdefend demo``: train a small CNN on scikit-learn's digits with and without the gradient defense."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import choose_from, require_at_least

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    from ..demo import DemoConfig, RUN_NAMES

    d = DemoConfig()
    names = {v: k for k, v in RUN_NAMES.items()}
    p = sub.add_parser(
        "demo",
        help="train a CNN on digits with and without the defense; TensorBoard logs, a table and a risk plot",
        description=(
            "Train the same small CNN on scikit-learn's digits undefended, with spectral noise and with isotropic "
            "noise of the same energy; log every run to TensorBoard under --out, print accuracy, risk (predicted "
            "PSNR), noise energy and step-time ratio, and write <out>/risk.png."
        ),
    )
    p.add_argument("--out", default=d.out, help=f"output directory for TensorBoard runs and the PNG (default: {d.out})")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default: {d.epochs}; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="4 epochs (a smoke run; accuracy a little lower) (default: off)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, batch order, probes, noise (default {d.seed})")
    p.add_argument("--budget", type=float, default=d.budget,
                   help=f"noise energy relative to the mean gradient's (default {d.budget})")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every,
                   help=f"steps between spectrum estimates (default {d.refresh_every})")
    p.add_argument("-k", type=int, default=d.k, help=f"singular triplets per probe (default {d.k}: the whole 8x8 input)")
    p.add_argument("--runs", default=",".join(RUN_NAMES[m] for m in d.mechanisms),
                   help=f"comma-separated runs among {', '.join(names)} (default: all)")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads during training (default {d.threads})")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0."""
    from ..demo import DemoConfig, RUN_NAMES, run_demo

    require_at_least(args.budget, "--budget", 0.0, meaning="noise energy relative to the mean gradient's",
                     example=str(DemoConfig.budget))
    names = {v: k for k, v in RUN_NAMES.items()}
    wanted = choose_from((r.strip() for r in args.runs.split(",") if r.strip()), names, "--runs", args.runs)
    epochs = args.epochs if args.epochs is not None else (4 if args.quick else DemoConfig.epochs)
    config = DemoConfig(
        out=args.out, epochs=epochs, seed=args.seed, budget=args.budget, k=args.k, refresh_every=args.refresh_every,
        mechanisms=tuple(names[r] for r in wanted), threads=args.threads,
    )
    run_demo(config)
    return 0
