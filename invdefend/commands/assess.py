"""``invdefend assess``: InvRE risk report for a user's model on a user's (or shipped) data."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..invre import MIN_PRIOR_SAMPLES, InvRE, format_comparison
from ..prior import DEFAULT_RANK, GaussianPrior
from ..risk import DEFAULT_RHO

__all__ = ["add_parser", "run", "load_callable", "load_data", "add_model_and_data_arguments"]

SHIPPED = ("digits", "sample-images")


def add_model_and_data_arguments(p: argparse.ArgumentParser, *, samples: int, verb: str) -> None:
    """The arguments every command that loads a model and data shares (read by :func:`load_callable` and
    :func:`load_data`): ``--model``, ``--checkpoint``, ``--data``, ``--x-key``, ``--y-key``, ``-n``."""
    p.add_argument("--model", required=True,
                   help="MODULE:CALLABLE or path/to/file.py:CALLABLE returning an nn.Module (called with no arguments)")
    p.add_argument("--checkpoint", help="a state_dict saved with torch.save, loaded into the model")
    p.add_argument("--data", required=True,
                   help=f"an .npz file (arrays named by --x-key/--y-key) or a shipped dataset: {', '.join(SHIPPED)}")
    p.add_argument("--x-key", default="x", help="input array name in the .npz (default: x)")
    p.add_argument("--y-key", default="y", help="label array name in the .npz (default: y)")
    p.add_argument("-n", "--num-samples", type=int, default=samples, help=f"samples to {verb} (default: {samples})")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``assess``."""
    p = sub.add_parser(
        "assess",
        help="estimate per-sample reconstruction risk (InvRE) of a model on data",
        description=(
            "Estimate the per-sample reconstruction risk of what a model shares (its per-sample gradient, or "
            "a cut-layer embedding) with InvRE; print a table and write a JSON report."
        ),
    )
    add_model_and_data_arguments(p, samples=16, verb="assess")
    p.add_argument("--target", choices=("gradient", "embedding"), default="gradient",
                   help="what is shared: per-sample gradient (default) or the model's output as an embedding")
    p.add_argument("-k", type=int, default=16, help="singular values estimated per sample (default: 16)")
    p.add_argument("--method", choices=("subspace", "exact"), default="subspace")
    p.add_argument("--tail", choices=("slq", "topk"), default="slq",
                   help="unestimated spectrum: Lanczos quadrature (default) or conservative top-k")
    p.add_argument("--rho", type=float, default=DEFAULT_RHO, help=f"attacker precision (default {DEFAULT_RHO})")
    p.add_argument("--prior", choices=("auto", "iid"), default="auto",
                   help="the attacker's prior: 'auto' (default) fits a Gaussian data prior on --prior-samples "
                        "calibration samples of the same data, disjoint from the assessed ones; 'iid' uses v0·I")
    p.add_argument("--prior-samples", type=int, default=256,
                   help="calibration samples the data prior is fitted on (default 256; fewer if the data has fewer)")
    p.add_argument("--dynamic-range", type=float, default=1.0, help="R of the inputs (default 1 for [0,1])")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="invdefend-report.json", help="JSON report path")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def load_callable(spec: str) -> Callable[..., Any]:
    """Resolve ``module:attr`` or ``path/to/file.py:attr`` to the attribute."""
    if ":" not in spec:
        raise ValueError(f"invdefend assess: --model {spec!r} must look like MODULE:CALLABLE or FILE.py:CALLABLE")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"invdefend assess: --model file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules.setdefault(path.stem, module)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, attr):
        raise AttributeError(f"invdefend assess: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def load_data(name: str, n: int, *, x_key: str = "x", y_key: str = "y", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples of a shipped dataset or an ``.npz`` file as float32 tensors."""
    from ..data import load_digits_tensors, natural_image_patches

    if n < 1:
        raise ValueError(f"invdefend assess: --num-samples={n} must be >= 1")
    if name == "digits":
        x, y = load_digits_tensors()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]
    if name == "sample-images":
        return natural_image_patches(n, seed=seed), None
    path = Path(name)
    if path.suffix != ".npz" or not path.is_file():
        raise FileNotFoundError(
            f"invdefend assess: --data {name!r} is neither an existing .npz file nor one of {', '.join(SHIPPED)}"
        )
    with np.load(path) as arrays:
        if x_key not in arrays:
            raise KeyError(f"invdefend assess: {path} has no array {x_key!r} (it has {sorted(arrays.files)}); set --x-key")
        x = torch.as_tensor(arrays[x_key][:n], dtype=torch.float32)
        y = torch.as_tensor(arrays[y_key][:n]).long() if y_key in arrays else None
    return x, y


def run(args: argparse.Namespace) -> int:
    """Build the model and data, run InvRE, print the table and write the report."""
    factory = load_callable(args.model)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"invdefend assess: {args.model} returned {type(model).__name__}, not an nn.Module")
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    extra = args.prior_samples if args.prior == "auto" else 0
    if extra < 0:
        raise ValueError(f"invdefend assess: --prior-samples={extra} must be >= 0")
    x_all, y_all = load_data(args.data, args.num_samples + extra, x_key=args.x_key, y_key=args.y_key, seed=args.seed)
    x, y = x_all[: args.num_samples], None if y_all is None else y_all[: args.num_samples]
    calibration = x_all[args.num_samples :]
    prior: Any = "iid" if args.prior == "iid" else "auto"
    if args.prior == "auto" and len(calibration) < MIN_PRIOR_SAMPLES:
        print(f"invdefend assess: only {len(calibration)} samples beyond the assessed ones; pricing with the i.i.d. "
              f"prior unless the assessed samples can cross-fit one (at least {2 * MIN_PRIOR_SAMPLES})")
    if args.prior == "auto" and len(calibration) >= MIN_PRIOR_SAMPLES:
        prior = GaussianPrior.fit(calibration, min(DEFAULT_RANK, len(calibration) - 1))
        print(f"invdefend assess: data prior fitted on {len(calibration)} calibration samples (not assessed), "
              f"rank {prior.rank}")
    if args.target == "gradient" and y is None:
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        # Labels are assumed known to the attacker; any fixed assignment is a valid scenario.
        y = torch.arange(len(x)) % classes
        print(f"invdefend assess: data has no labels; using labels i mod {classes}")
    estimator = InvRE(
        model, F.cross_entropy if args.target == "gradient" else None, target=args.target, k=args.k,
        method=args.method, tail=args.tail, rho=args.rho, prior=prior, dynamic_range=args.dynamic_range,
        batch_size=args.batch_size, seed=args.seed, progress=args.progress,
    )
    name = Path(args.model.rsplit(":", 1)[0]).stem + ":" + args.model.rsplit(":", 1)[1]
    report = estimator.assess(x, y, name=name)
    report.settings.update({"model": args.model, "checkpoint": args.checkpoint, "data": args.data})
    print(format_comparison({name: report}))
    e = report.estimator
    print(f"estimator: {e['sweeps_max']} sweeps max, converged {e['converged_fraction']:.0%}, "
          f"max residual {e['max_residual']:.2e}, tail={e['tail']}, {e['seconds']:.1f} s")
    path = report.save(args.out)
    print(f"report written to {path}")
    return 0
