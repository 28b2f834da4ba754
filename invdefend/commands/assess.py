"""``invdefend assess``: InvRE risk report for a user's model on a user's (or shipped) data."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..invre import MIN_PRIOR_SAMPLES, InvRE, format_comparison
from ..jacobian import select_parameters
from ..prior import DEFAULT_RANK, GaussianPrior
from ..risk import DEFAULT_RHO
from .errors import UsageError, require, require_at_least

__all__ = [
    "add_model_and_data_arguments", "add_parser", "build_model", "check_arguments", "check_labels",
    "expected_input", "first_output", "load_callable", "load_data", "parameter_subset", "public_callables", "run",
    "samples_used",
]

SHIPPED = ("digits", "sample-images")
MODEL_FORMS = "MODULE:CALLABLE or FILE.py:CALLABLE"
EXAMPLE_MODEL = "examples/model_zoo.py:lenet_digits"


def add_model_and_data_arguments(p: argparse.ArgumentParser, *, samples: int, verb: str) -> None:
    """The arguments every command that loads a model and data shares (read by :func:`build_model` and
    :func:`load_data`): ``--model``, ``--checkpoint``, ``--data``, ``--x-key``, ``--y-key``, ``-n``."""
    p.add_argument("--model", required=True,
                   help=f"{MODEL_FORMS}: a callable returning an nn.Module, called with no arguments (or an "
                        f"nn.Module object), e.g. {EXAMPLE_MODEL} (required)")
    p.add_argument("--checkpoint", default=None,
                   help="a state_dict saved with torch.save, loaded into the model (default: none, the "
                        "factory's weights)")
    p.add_argument("--data", required=True,
                   help=f"an .npz file (arrays named by --x-key/--y-key, one label per input) or a shipped "
                        f"dataset: {', '.join(SHIPPED)} (required). Inputs must be in [0, 1]: uint8 inputs, "
                        "and inputs within [0, 255] whose maximum exceeds 1.5, are divided by 255 (a notice "
                        "says so); inputs in any other range are refused")
    p.add_argument("--x-key", default="x", help="input array name in the .npz (default: %(default)s)")
    p.add_argument("--y-key", default=None,
                   help="label array name in the .npz (default: y when the file has it; without labels, "
                        "sample i gets label i mod classes)")
    p.add_argument("-n", "--num-samples", type=int, default=samples,
                   help=f"samples to {verb}, at least 1; more than the data holds are clamped to what it holds, "
                        "with a notice (default: %(default)s)")


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
                   help="what is shared: the per-sample gradient or the model's output as an embedding "
                        "(default: %(default)s)")
    p.add_argument("-k", type=int, default=16, help="singular values estimated per sample (default: %(default)s)")
    p.add_argument("--method", choices=("subspace", "exact"), default="subspace",
                   help="spectrum estimator: block Krylov subspace iteration, or the exact SVD of the built "
                        "Jacobian (small models only) (default: %(default)s)")
    p.add_argument("--tail", choices=("slq", "topk"), default="slq",
                   help="unestimated spectrum: Lanczos quadrature (slq) or conservative top-k "
                        "(default: %(default)s)")
    p.add_argument("--rho", type=float, default=DEFAULT_RHO, help="attacker precision (default: %(default)s)")
    p.add_argument("--prior", choices=("auto", "iid"), default="auto",
                   help="the attacker's prior: 'auto' fits a Gaussian data prior on --prior-samples "
                        "calibration samples of the same data, disjoint from the assessed ones; 'iid' uses v0·I "
                        "(default: %(default)s)")
    p.add_argument("--prior-samples", type=int, default=256,
                   help="calibration samples the data prior is fitted on; fewer if the data has fewer "
                        "(default: %(default)s)")
    p.add_argument("--dynamic-range", type=float, default=1.0,
                   help="R of the inputs; 1 for [0, 1], where 0-255 data is rescaled; any other value takes "
                        "the data as it is (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="samples estimated together (default: %(default)s)")
    p.add_argument("--params", default=None, metavar="NAME,NAME",
                   help="assess through a layer subset (gradient target): the spectrum of the gradient of these "
                        "parameters or modules (names as in model.named_parameters() / named_modules()), the "
                        "others' leakage bounded by their Jacobian's norm, so the risk stays an upper bound "
                        "(docs/theory.md §10.6) (default: every parameter)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the data draw and the estimator's random probes (default: %(default)s)")
    p.add_argument("--out", default="runs/assess.json",
                   help="JSON report path; parent folders are created (default: %(default)s, git-ignored)")
    p.add_argument("--progress", action="store_true", help="show a progress bar (default: off)")
    return p


def load_callable(spec: str) -> Callable[..., Any]:
    """Resolve ``module:attr`` or ``path/to/file.py:attr`` to the attribute; :class:`UsageError` when the
    spec, the module, the file or the attribute is wrong (listing the callables the module offers)."""
    target, _, attr = spec.rpartition(":")
    require(bool(target and attr), f"--model {spec!r} is not of the form {MODEL_FORMS}; give one, e.g. "
                                   f"--model {EXAMPLE_MODEL}")
    module = _import_target(target)
    found = getattr(module, attr, None)
    if not callable(found):
        offers = public_callables(module)
        listed = ", ".join(offers[:12]) + (", ..." if len(offers) > 12 else "") if offers else "none"
        raise UsageError(f"--model {spec!r}: {target} has no callable {attr!r} (available: {listed}); give "
                         f"{MODEL_FORMS} naming one of them")
    return found


def _import_target(target: str) -> ModuleType:
    """The module named by the part of ``--model`` before the colon: a ``.py`` file or an importable module."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        require(path.is_file(), f"--model file {target} does not exist; give {MODEL_FORMS} (a path to an "
                                "existing .py file, or an importable module)")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules.setdefault(path.stem, module)
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if not exc.name or not (target == exc.name or target.startswith(exc.name + ".")):
            raise  # the module exists but imports a missing one: its traceback says which
        raise UsageError(f"--model: no module named {exc.name!r}; give {MODEL_FORMS} (the module must be "
                         "importable: installed or on PYTHONPATH; a file needs its path ending in .py)") from None


def public_callables(module: ModuleType) -> list[str]:
    """The public callables ``module`` defines itself (or lists in ``__all__``), sorted."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return sorted(n for n in names if callable(getattr(module, n, None)))


def build_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """The ``nn.Module`` that ``--model`` names (a factory called with no arguments, or a module object),
    with ``--checkpoint``'s state_dict loaded; :class:`UsageError` for what the user can fix."""
    factory = load_callable(spec)
    if isinstance(factory, nn.Module):
        model: Any = factory
    else:
        required = _required_parameters(factory)
        require(not required, f"--model {spec} needs arguments ({', '.join(required)}); give a callable that "
                              "takes none, e.g. a function in a .py file that builds the model with them")
        model = factory()
    require(isinstance(model, nn.Module), f"--model {spec} returned {type(model).__name__}, not an nn.Module; "
                                          "the callable must build and return the model (a torch.nn.Module)")
    if checkpoint:
        _load_checkpoint(model, checkpoint)
    return model


def _required_parameters(factory: Callable[..., Any]) -> list[str]:
    """Parameters of ``factory`` without a default (none when its signature cannot be read)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in params if p.kind not in variadic and p.default is inspect.Parameter.empty]


def _load_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Load ``--checkpoint`` into ``model``; a missing file or mismatched keys are usage errors."""
    require(Path(checkpoint).is_file(), f"--checkpoint {checkpoint} does not exist; give a state_dict saved "
                                        "with torch.save(model.state_dict(), path)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- only the reading of the user's file, which may raise anything
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise UsageError(f"--checkpoint {checkpoint} cannot be loaded ({reason}); give a state_dict saved with "
                         "torch.save(model.state_dict(), path)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UsageError(f"--checkpoint {checkpoint} does not fit --model ({detail}); give the state_dict of "
                         "the model the factory builds") from None


def load_data(
    name: str, n: int, *, x_key: str = "x", y_key: str | None = None, seed: int = 0, unit_range: bool = True,
    command: str = "assess",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``n`` samples of a shipped dataset (a seeded draw) or an ``.npz`` file (its first ``n``) as float32
    inputs and int64 labels (``None`` without labels; ``y_key=None`` takes ``"y"`` when the file has it). With
    ``unit_range``, 0-255 inputs are divided by 255 (a notice says so) and inputs in any other range than
    [0, 1] are refused. Mistakes raise :class:`UsageError`."""
    from ..data import load_digits_tensors, natural_image_patches

    require_at_least(n, "-n", 1, example="4")
    if name == "digits":
        x, y = load_digits_tensors()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]
    if name == "sample-images":
        return natural_image_patches(n, seed=seed), None
    inputs, labels = _read_npz(name, x_key, y_key)
    inputs, labels = inputs[:n], None if labels is None else labels[:n]
    if unit_range:
        inputs = _to_unit_range(inputs, name, command)
    return torch.as_tensor(inputs, dtype=torch.float32), None if labels is None else torch.as_tensor(labels).long()


def samples_used(available: int, n: int, data: str, command: str) -> int:
    """``min(n, available)``: ``-n`` larger than the data is clamped, with a one-line notice."""
    if available < n:
        print(f"invdefend {command}: -n {n} but --data {data} holds {available} samples; using {available}")
    return min(n, available)


def _read_npz(name: str, x_key: str, y_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs and labels (or ``None``) an ``.npz`` file holds under ``x_key`` and ``y_key``."""
    path = Path(name)
    require(path.suffix == ".npz" and path.is_file(), f"--data {name!r} is neither an existing .npz file nor one "
            f"of {', '.join(SHIPPED)}; give the path of an .npz file (numpy.savez(path, x=inputs, y=labels)) "
            "or a shipped dataset's name")
    try:
        arrays = np.load(path)
        require(hasattr(arrays, "files"), f"--data {name} holds one array, not named ones; save it with "
                                          "numpy.savez(path, x=inputs, y=labels)")
        with arrays:
            keys = sorted(arrays.files)
            y_name = y_key if y_key is not None else ("y" if "y" in keys else None)
            for key, flag in ((x_key, "--x-key"), (y_name, "--y-key")):
                require(key is None or key in keys, f"--data {name} has no array {key!r} (it holds "
                        f"{', '.join(keys) or 'none'}); set {flag} to one of them")
            x, y = arrays[x_key], None if y_name is None else arrays[y_name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--data {name} cannot be read as an .npz file of numeric arrays ({exc}); save it "
                         "with numpy.savez(path, x=inputs, y=labels)") from None
    require(x.dtype.kind in "biuf" and x.ndim >= 2 and len(x) >= 1, f"--data {name}: {x_key!r} is {x.dtype} "
            f"shaped {x.shape}; give numeric inputs shaped (samples, ...), at least one sample")
    labels = 0 if y is None or y.ndim == 0 else len(y)
    require(y is None or labels == len(x), f"--data {name}: {labels} labels ({y_name!r}) for {len(x)} inputs "
            f"({x_key!r}); give one label per input")
    return x, y


def _to_unit_range(x: np.ndarray, name: str, command: str) -> np.ndarray:
    """``x`` in [0, 1]: uint8 inputs, and inputs within [0, 255] whose maximum exceeds 1.5, are divided by 255
    (a one-line notice says so); inputs in any other range than [0, 1] are refused."""
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if x.dtype == np.uint8 or (lo >= 0 and 1.5 < hi <= 255):
        why = "uint8" if x.dtype == np.uint8 else f"max {hi:g} > 1.5"
        print(f"invdefend {command}: --data {name} inputs taken as 0-255 ({why}); divided by 255 to [0, 1]")
        return x.astype(np.float32) / 255.0
    other = ", or give their range with --dynamic-range" if command == "assess" else ""
    require(lo >= -0.5 and hi <= 1.5, f"--data {name} inputs span [{lo:g}, {hi:g}], neither [0, 1] nor 0-255; "
            f"save them in [0, 1] (move a mean/std normalisation into the model){other}")
    return x


#: torch's words for a forward pass given inputs of the wrong shape (and not of the wrong dtype).
_SHAPE_WORDS = re.compile(r"shape|size|channels|dimension", re.IGNORECASE)
_DTYPE_WORDS = re.compile(r"dtype|scalar type", re.IGNORECASE)


def first_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x[:1]`` (eval mode, no grad, every module's mode restored); a shape error is a
    :class:`UsageError` that names the input shape the model expects, when it can be read off its first layer."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(x[:1])
    except (RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        if not _SHAPE_WORDS.search(text) or _DTYPE_WORDS.search(text):
            raise
        expects = expected_input(model)
        raise UsageError(
            f"the model cannot take --data samples shaped {tuple(x.shape[1:])}"
            + (f": it expects {expects}" if expects else "")
            + "; give data shaped like the model's training inputs, or a --model built for this data "
            + f"(torch: {text[:200]})"
        ) from None
    finally:
        for m, flag in modes:
            m.train(flag)


def expected_input(model: nn.Module) -> str | None:
    """The per-sample input shape the model's first Conv or Linear layer takes, in words (``None`` if its first
    such layer is lazy or there is none, or an Embedding comes first)."""
    for m in model.modules():
        if isinstance(m, (LazyModuleMixin, nn.Embedding, nn.EmbeddingBag)):
            return None
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = ("L", "H, W", "D, H, W")[len(m.kernel_size) - 1]
            layer = f"first layer {type(m).__name__} with in_channels={m.in_channels}"
            return f"samples shaped ({m.in_channels}, {dims}) ({layer})"
        if isinstance(m, nn.Linear):
            return f"samples of {m.in_features} features (first layer Linear with in_features={m.in_features})"
    return None


def check_labels(y: torch.Tensor, output: torch.Tensor) -> None:
    """Refuse class labels outside ``0 .. classes-1`` of a classifier's ``(1, classes)`` output."""
    if output.dim() != 2 or y.dim() != 1 or not len(y):
        return
    classes, lo, hi = output.shape[-1], int(y.min()), int(y.max())
    require(lo >= 0 and hi < classes, f"--data labels span {lo}..{hi} but the model outputs {classes} classes; "
            f"give labels in 0..{classes - 1} (set --y-key to the labels' array)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before any model is built or data read."""
    require_at_least(args.num_samples, "-n", 1, example="16")
    require_at_least(args.k, "-k", 1, example="16")
    require_at_least(args.batch_size, "--batch-size", 1, example="8")
    require_at_least(args.prior_samples, "--prior-samples", 0, example="256")
    require_at_least(args.rho, "--rho", 0.0, meaning="attacker precision", example=str(DEFAULT_RHO))
    require(math.isfinite(args.dynamic_range) and args.dynamic_range > 0,
            f"--dynamic-range must be a finite number > 0, got {args.dynamic_range}; use e.g. --dynamic-range 1")


def parameter_subset(model: nn.Module, spec: str | None, target: str) -> list[str] | None:
    """The names ``--params`` gives (comma-separated), checked against the model; :class:`UsageError` for an
    empty list, an embedding target, or names the model does not have (listed) or that are frozen."""
    if spec is None:
        return None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    require(bool(names), f"--params {spec!r} names nothing; give comma-separated parameter or module names, "
                         "e.g. --params classifier")
    require(target == "gradient", "--params chooses parameters of the shared gradient; drop it with "
                                  "--target embedding")
    try:
        select_parameters(model, names, where="assess")
    except ValueError as exc:
        raise UsageError(f"--params {spec!r}: {str(exc).partition(': ')[2]}") from None
    return names


def run(args: argparse.Namespace) -> int:
    """Build the model and data, run InvRE, print the table and write the report."""
    check_arguments(args)
    model = build_model(args.model, args.checkpoint)
    params = parameter_subset(model, getattr(args, "params", None), args.target)
    extra = args.prior_samples if args.prior == "auto" else 0
    x_all, y_all = load_data(args.data, args.num_samples + extra, x_key=args.x_key, y_key=args.y_key,
                             seed=args.seed, unit_range=args.dynamic_range == 1.0)
    n = samples_used(len(x_all), args.num_samples, args.data, "assess")
    x, y = x_all[:n], None if y_all is None else y_all[:n]
    output = first_output(model, x)
    if args.target == "gradient" and y is not None:
        check_labels(y, output)
    calibration = x_all[n:]
    prior: Any = "iid" if args.prior == "iid" else "auto"
    if args.prior == "auto" and len(calibration) < MIN_PRIOR_SAMPLES:
        print(f"invdefend assess: only {len(calibration)} samples beyond the assessed ones; pricing with the i.i.d. "
              f"prior unless the assessed samples can cross-fit one (at least {2 * MIN_PRIOR_SAMPLES})")
    if args.prior == "auto" and len(calibration) >= MIN_PRIOR_SAMPLES:
        prior = GaussianPrior.fit(calibration, min(DEFAULT_RANK, len(calibration) - 1))
        print(f"invdefend assess: data prior fitted on {len(calibration)} calibration samples (not assessed), "
              f"rank {prior.rank}")
    if args.target == "gradient" and y is None:
        classes = output.shape[-1]
        # Labels are assumed known to the attacker; any fixed assignment is a valid scenario.
        y = torch.arange(len(x)) % classes
        print(f"invdefend assess: data has no labels; using labels i mod {classes}")
    estimator = InvRE(
        model, F.cross_entropy if args.target == "gradient" else None, target=args.target, k=args.k,
        method=args.method, tail=args.tail, rho=args.rho, prior=prior, dynamic_range=args.dynamic_range,
        batch_size=args.batch_size, seed=args.seed, progress=args.progress, params=params,
    )
    name = Path(args.model.rsplit(":", 1)[0]).stem + ":" + args.model.rsplit(":", 1)[1]
    report = estimator.assess(x, y, name=name)
    report.settings.update({"model": args.model, "checkpoint": args.checkpoint, "data": args.data})
    print(format_comparison({name: report}))
    e = report.estimator
    print(f"estimator: {e['sweeps_max']} sweeps max, converged {e['converged_fraction']:.0%}, "
          f"max residual {e['max_residual']:.2e}, tail={e['tail']}, {e['seconds']:.1f} s")
    if params is not None:
        bound = report.settings["rest_bound"]
        print(f"layer subset {','.join(params)}: the other parameters' Jacobian norm bounded by {min(bound):.3g}.."
              f"{max(bound):.3g} (Lanczos x{report.settings['rest_rule']['factor']:.3f}); risk is an upper bound")
    path = report.save(args.out)
    print(f"report written to {path}")
    return 0
