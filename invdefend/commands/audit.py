"""``invdefend audit``: run real attacks on a model's shared gradient, with and without a defense."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .assess import add_model_and_data_arguments, load_callable, load_data

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``audit``."""
    from ..audit import ATTACKS, DEFENSES

    p = sub.add_parser(
        "audit",
        help="attack a model's shared gradients (batch of one) with and without a defense; compare with InvRE",
        description=(
            "Run gradient-inversion attacks on samples of a model's shared gradient, undefended and under a "
            "defense, and write audit.json, grid.png (originals vs reconstructions) and scatter.png (InvRE's "
            "predicted PSNR vs the strongest attack's PSNR) into --out."
        ),
    )
    add_model_and_data_arguments(p, samples=4, verb="attack")
    p.add_argument("--attacks", default="dlg,ig,aware",
                   help=f"comma-separated, from {','.join(ATTACKS)} (aware runs only under a noisy defense)")
    p.add_argument("--defense", choices=DEFENSES, default="spectral",
                   help="defense compared with the undefended release (default: spectral; none: baseline only; "
                        "band_pass is audited against the Gaussian law it approximates, from the exact SVD of "
                        "each sample's gradient Jacobian, so its cost grows with d*m)")
    p.add_argument("--budget", type=float, default=0.05, help="defense noise energy relative to ||g||^2")
    p.add_argument("--floor", type=float, default=None,
                   help="isotropic noise energy relative to ||g||^2 added by the defense on top of --budget "
                        "(default: each defense's own, half of --budget for spectral, none for band_pass and "
                        "isotropic); recommended with band_pass, e.g. --budget 0.075 --floor 0.025")
    p.add_argument("--iterations", type=int, default=200, help="iterations of every attack (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model factory, the data draw, attacks and noise")
    p.add_argument("--out", default="invdefend-audit", help="output directory (default: invdefend-audit)")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="also write a self-contained HTML report (settings, threat model, images, scatter, "
                        "per-sample table) to PATH")
    return p


def run(args: argparse.Namespace) -> int:
    """Build the model and data, run the audit, print a summary and write the files."""
    from ..audit import audit, format_summary, save_audit

    if args.floor is not None and not (math.isfinite(args.floor) and args.floor >= 0):
        raise SystemExit(f"invdefend audit: --floor must be a finite number >= 0 (0 disables it), got {args.floor}")
    torch.manual_seed(args.seed)  # a factory that draws random weights gives the same model every run
    model = load_callable(args.model)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"invdefend audit: {args.model} returned {type(model).__name__}, not an nn.Module")
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    x, y = load_data(args.data, args.num_samples, x_key=args.x_key, y_key=args.y_key, seed=args.seed)
    if y is None:
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        y = torch.arange(len(x)) % classes
        print(f"invdefend audit: data has no labels; using labels i mod {classes}")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    defenses = ["none"] if args.defense == "none" else ["none", args.defense]
    report = audit(model, F.cross_entropy, x, y, attacks=attacks, defenses=defenses, budget=args.budget,
                   floor=args.floor, iterations=args.iterations, seed=args.seed, progress=print)
    report.settings.update({"model": args.model, "checkpoint": args.checkpoint, "data": args.data})
    print(format_summary(report.summary()))
    files = save_audit(report, Path(args.out))
    print("written: " + ", ".join(str(p) for p in files.values()))
    if args.html:
        from ..report import write_html_report

        print(f"HTML report: {write_html_report(report, args.html)}")
    return 0
