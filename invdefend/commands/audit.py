"""``invdefend audit``: run real attacks on a model's shared gradient, with and without a defense."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..invre import MIN_PRIOR_SAMPLES
from .assess import (
    add_model_and_data_arguments,
    build_model,
    check_labels,
    first_output,
    load_data,
    samples_used,
)
from .errors import choose_from, require, require_at_least

__all__ = ["add_parser", "run", "DEFAULT_ATTACKS"]

#: The attacks ``invdefend audit`` runs unless ``--attacks`` says otherwise: the whole suite but iDLG (whose
#: label recovery the others do not need: the label is given).
DEFAULT_ATTACKS = "dlg,ig,aware,prior,class_prior"



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
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated, from {','.join(ATTACKS)}; aware, prior and class_prior run only under a "
                        "noisy defense, and prior / class_prior attack with a Gaussian image prior fitted on "
                        "--prior-samples further samples of --data (never the audited ones), one per label for "
                        f"class_prior (default: {DEFAULT_ATTACKS}; the prior attacks are left out, with a notice, "
                        "when the data holds too few further samples)")
    p.add_argument("--prior-samples", type=int, default=256,
                   help="samples beyond the audited ones that the prior attacks fit their priors on "
                        "(default: %(default)s; fewer if the data holds fewer)")
    p.add_argument("--defense", choices=DEFENSES, default="spectral",
                   help="defense compared with the undefended release (default: spectral; none: baseline only; "
                        "band_pass is audited against the Gaussian law it approximates, from the exact SVD of "
                        "each sample's gradient Jacobian, so its cost grows with d*m)")
    p.add_argument("--budget", type=float, default=0.05,
                   help="defense noise energy relative to ||g||^2, >= 0 (default: %(default)s)")
    p.add_argument("--floor", type=float, default=None,
                   help="isotropic noise energy relative to ||g||^2 added by the defense on top of --budget "
                        "(default: each defense's own, half of --budget for spectral, none for band_pass and "
                        "isotropic); recommended with band_pass, e.g. --budget 0.075 --floor 0.025")
    p.add_argument("--iterations", type=int, default=200, help="iterations of every attack (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the model factory, the data draw, attacks and noise (default: %(default)s)")
    p.add_argument("--out", default="runs/audit", help="output directory (default: %(default)s, git-ignored)")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="also write a self-contained HTML report (settings, threat model, images, scatter, "
                        "per-sample table) to PATH (default: none)")
    return p


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Refuse out-of-range flags before any model is built or attack run; returns the attacks' names."""
    from ..audit import ATTACKS

    require_at_least(args.budget, "--budget", 0.0, meaning="noise energy relative to ||g||^2", example="0.05")
    if args.floor is not None:
        require_at_least(args.floor, "--floor", 0.0, meaning="0 disables it", example="0.025")
    require_at_least(args.num_samples, "-n", 1, example="4")
    require_at_least(args.iterations, "--iterations", 1, example="200")
    require_at_least(args.prior_samples, "--prior-samples", 0, example="256")
    given = DEFAULT_ATTACKS if args.attacks is None else args.attacks
    return choose_from((a.strip() for a in given.split(",") if a.strip()), ATTACKS, "--attacks", given)


def run(args: argparse.Namespace) -> int:
    """Build the model and data, run the audit, print a summary and write the files."""
    from ..audit import audit, fit_attacker_priors, format_summary, save_audit

    attacks = check_arguments(args)
    torch.manual_seed(args.seed)  # a factory that draws random weights gives the same model every run
    model = build_model(args.model, args.checkpoint)
    model.eval()
    with_prior = bool({"prior", "class_prior"} & set(attacks))
    extra = args.prior_samples if with_prior else 0
    x_all, y_all = load_data(args.data, args.num_samples + extra, x_key=args.x_key, y_key=args.y_key, seed=args.seed,
                             command="audit")
    n = samples_used(len(x_all), args.num_samples, args.data, "audit")
    x, y = x_all[:n], None if y_all is None else y_all[:n]
    output = first_output(model, x)
    if y is None:
        classes = output.shape[-1]
        y = torch.arange(len(x)) % classes
        print(f"invdefend audit: data has no labels; using labels i mod {classes}")
    check_labels(y, output)
    prior, class_priors = None, None
    if with_prior:
        calibration = x_all[n:]
        if len(calibration) < MIN_PRIOR_SAMPLES:
            require(args.attacks is None,
                    f"--attacks {args.attacks!r}: the prior attacks need at least {MIN_PRIOR_SAMPLES} samples of "
                    f"--data beyond the {n} audited, and it holds {len(calibration)}; lower -n, give more data or "
                    "leave prior and class_prior out of --attacks")
            attacks = [a for a in attacks if a not in ("prior", "class_prior")]
            print(f"invdefend audit: --data holds {len(calibration)} samples beyond the audited ones (< "
                  f"{MIN_PRIOR_SAMPLES}); the prior attacks are left out")
        else:
            prior, class_priors = fit_attacker_priors(calibration, None if y_all is None else y_all[n:], y)
            print(f"invdefend audit: attacker priors fitted on {len(calibration)} samples of --data (not audited)")
    defenses = ["none"] if args.defense == "none" else ["none", args.defense]
    report = audit(model, F.cross_entropy, x, y, attacks=attacks, defenses=defenses, budget=args.budget,
                   floor=args.floor, iterations=args.iterations, seed=args.seed, progress=print, prior=prior,
                   class_priors=class_priors)
    report.settings.update({"model": args.model, "checkpoint": args.checkpoint, "data": args.data})
    print(format_summary(report.summary()))
    files = save_audit(report, Path(args.out))
    print("written: " + ", ".join(str(p) for p in files.values()))
    if args.html:
        from ..report import write_html_report

        print(f"HTML report: {write_html_report(report, args.html)}")
    return 0
