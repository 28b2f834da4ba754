"""Step-time overhead of :class:`invdefend.GradientDefense` against a plain step and an Opacus DP-SGD step.

Three copies of the same model (3×32×32 inputs, batch 32, SGD) train side by side in one process,
interleaved step by step (the order rotates every round so that no variant always runs after another), each
step timed as ``zero_grad + forward + backward + step``. The model is ``--model lenet`` (default: the
LeNet-style CNN of DLG, width 12, sigmoid) or ``--model resnet`` (:class:`invdefend.models.SmallResNet`:
two stages of two basic blocks, width 16/32, ReLU, no normalisation; 42,986 parameters):

* ``plain``    — the unmodified loop;
* ``defended`` — the same loop with ``GradientDefense(model, criterion)`` at its default settings (the
  default placement: water-filling on the top-k of the Jacobian whitened by the data prior fitted online on
  the batches already released, :class:`invdefend.prior.OnlinePrior`, half of the budget an isotropic floor),
  or those the options set (``--prior none`` passes ``prior=None``), and ``optimizer = defense.wrap(optimizer)``;
* ``opacus``   — ``PrivacyEngine().make_private(..., noise_multiplier=1.0, max_grad_norm=1.0)``.

Warm-up, excluded from the figures: ``--warmup`` rounds of all three, which include the defense's first
(cold-started) spectrum estimate and the one-time compilation cost of the first ``torch.func`` call. With
the online prior (the default) the prior needs 128 released samples (4 batches) before it is used, so the warm-up's
estimate is priced i.i.d. and the measured refresh steps (from step ``refresh_every`` on) are whitened.

Every ratio is *paired*: a variant's step divided by the plain step of the same round (the three ran back
to back), so that slow changes in machine load cancel, and the median over rounds drops the bursts. The
defense does more work on its refresh steps (one every ``refresh_every``) than on the others, so it gets
two ratios — the median over refresh steps and over the steps between — and ``defended_over_plain`` is
their *amortised* combination ``(refresh + (R − 1) · between) / R`` over a refresh period of ``R`` steps:
what training with it costs. Plain means over all steps are printed too. Only ratios measured in this one
run are printed.

The last line printed is one JSON object (``defended_over_plain``, ``opacus_over_plain`` and details;
``model`` names the model measured, ``defense`` the defense's settings).

    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --quick --model resnet
    python benchmarks/overhead.py --quick --prior none --floor 0
    python benchmarks/overhead.py --mechanism band_pass --budget 0.075 --floor 0.025 --rounds 40 --warmup 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from invdefend import DefenseSettings, GradientDefense
from invdefend.data import natural_image_patches
from invdefend.models import LeNet, SmallResNet
from invdefend.placements import available

BATCH = 32
#: ``--model`` choices: the constructor (3×32×32 inputs, 10 classes) and the description the JSON line carries.
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "lenet": (LeNet, "LeNet(3x32x32, width 12, sigmoid)"),
    "resnet": (SmallResNet, "SmallResNet(3x32x32, width 16/32, 2 basic blocks per stage, relu, no norm)"),
}


def _timed(step: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def build(seed: int, lr: float, settings: dict[str, object], model: str = "lenet") -> dict[str, object]:
    """The three identically initialised variants of ``model`` (a :data:`MODELS` key) and the data they share."""
    torch.manual_seed(seed)
    base = MODELS[model][0]()
    images = natural_image_patches(8 * BATCH, seed=seed)
    labels = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(seed))
    criterion = nn.CrossEntropyLoss()

    plain = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=lr)

    defended = copy.deepcopy(base)
    def_criterion = nn.CrossEntropyLoss()
    defense = GradientDefense(defended, def_criterion, seed=seed, **settings)
    def_opt = defense.wrap(torch.optim.SGD(defended.parameters(), lr=lr))

    from opacus import PrivacyEngine  # imported here: a benchmark dependency, not the library's

    dp_model = copy.deepcopy(base)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and the accountant; not measured here
        dp_model, dp_opt, _ = PrivacyEngine().make_private(
            module=dp_model,
            optimizer=torch.optim.SGD(dp_model.parameters(), lr=lr),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    return dict(images=images, labels=labels, criterion=criterion, plain=plain, plain_opt=plain_opt,
                defended=defended, def_criterion=def_criterion, defense=defense, def_opt=def_opt,
                dp_model=dp_model, dp_opt=dp_opt)


def measure(
    rounds: int, warmup: int, seed: int = 0, lr: float = 0.01, settings: dict[str, object] | None = None,
    model: str = "lenet",
) -> dict[str, object]:
    """Interleave ``warmup + rounds`` steps of each variant; return the per-step times and the ratios.

    ``settings`` overrides GradientDefense defaults (``k``, ``probes``, ``sweeps``, ``refresh_every``,
    ``mechanism``, ``budget``, ``floor``, ``prior``, ...); ``model`` is a :data:`MODELS` key.
    """
    env = build(seed, lr, settings or {}, model)
    images, labels = env["images"], env["labels"]
    defense: GradientDefense = env["defense"]  # type: ignore[assignment]
    n_batches = len(images) // BATCH
    cursor = {"i": 0}

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = cursor["i"] % n_batches
        return images[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH]

    def plain_step() -> None:
        x, y = batch()
        env["plain_opt"].zero_grad()
        env["criterion"](env["plain"](x), y).backward()
        env["plain_opt"].step()

    def defended_step() -> None:
        x, y = batch()
        env["def_opt"].zero_grad()
        env["def_criterion"](env["defended"](x), y).backward()
        env["def_opt"].step()

    def opacus_step() -> None:
        x, y = batch()
        env["dp_opt"].zero_grad()
        env["criterion"](env["dp_model"](x), y).backward()
        env["dp_opt"].step()

    steps = {"plain": plain_step, "defended": defended_step, "opacus": opacus_step}
    order = list(steps)
    times: dict[str, list[float]] = {k: [] for k in steps}
    refreshed: list[bool] = []
    sweeps_used: list[int] = []
    errors: list[float] = []
    fallbacks = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(warmup + rounds):
            rot = order[r % 3 :] + order[: r % 3]
            for name in rot:
                t = _timed(steps[name])
                if r >= warmup:
                    times[name].append(t)
                    if name == "defended":
                        rec = defense.last_record
                        refreshed.append(bool(rec.refreshed))
                        fallbacks += int(rec.fallback)
                        if rec.refreshed and not rec.fallback:
                            sweeps_used.append(rec.sweeps)
                            errors.append(rec.max_residual)
            cursor["i"] += 1
    plain = statistics.median(times["plain"])
    # Paired ratios: each variant's step over the plain step of the same round (the three ran back to back),
    # so that slow changes in machine load cancel; medians then drop the bursts.
    d_ratio = [d / p for d, p in zip(times["defended"], times["plain"])]
    o_ratio = [o / p for o, p in zip(times["opacus"], times["plain"])]
    other = [r for r, f in zip(d_ratio, refreshed) if not f]
    refresh = [r for r, f in zip(d_ratio, refreshed) if f]
    R = defense.refresh_every
    med_other = statistics.median(other)
    med_refresh = statistics.median(refresh) if refresh else float("nan")
    amortised = (med_refresh + (R - 1) * med_other) / R if refresh else med_other
    return {
        "defended_over_plain": amortised,
        "opacus_over_plain": statistics.median(o_ratio),
        "defended_step_over_plain": med_other,
        "defended_refresh_step_over_plain": med_refresh,
        "defended_mean_over_plain_mean": statistics.fmean(times["defended"]) / statistics.fmean(times["plain"]),
        "opacus_mean_over_plain_mean": statistics.fmean(times["opacus"]) / statistics.fmean(times["plain"]),
        "plain_step_ms": plain * 1e3,
        "refresh_steps_measured": len(refresh),
        "steps_measured": len(times["defended"]),
        "fallbacks": fallbacks,
        "defense": {"budget": defense.budget, "k": defense.k, "probes": defense.probes, "refresh_every": R,
                    "sweeps": defense.sweeps, "oversample": defense.oversample, "mechanism": defense.mechanism,
                    "floor": defense.floor, "energy_split": defense.settings.energy_split("gradient"),
                    "prior": "none" if defense.prior is None else str(defense.prior),
                    "defaults": not settings},
        "estimator_sweeps": sweeps_used, "estimator_error_max": max(errors) if errors else None,
        "model": MODELS[model][1], "batch": BATCH, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table, then the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 refresh periods instead of 10 (about a minute)")
    p.add_argument("--rounds", type=int, default=None, help="measured steps of each variant (overrides --quick)")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured rounds first (default 10)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: a batch-32 LeNet gains nothing from more, and "
                        "spinning threads distort timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    for name in ("k", "probes", "sweeps", "refresh-every", "oversample", "band-pass-steps"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the GradientDefense default")
    for name in ("budget", "floor"):
        p.add_argument(f"--{name}", type=float, default=None, help="override the GradientDefense default")
    p.add_argument("--mechanism", choices=available("gradient"), default=None,
                   help="GradientDefense mechanism (default: its default, 'spectral')")
    p.add_argument("--model", choices=sorted(MODELS), default="lenet",
                   help="the model all three variants train (default lenet; resnet: SmallResNet), 3x32x32 inputs")
    p.add_argument("--prior", choices=("none", "online"), default=None,
                   help="the defense's data prior: none (prior=None, i.i.d.) or online (prior='online'); default: "
                        "GradientDefense's default (online)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ("k", "probes", "sweeps", "refresh_every", "oversample", "band_pass_steps", "budget", "floor", "mechanism")
    settings = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.prior is not None:
        settings["prior"] = None if args.prior == "none" else args.prior
    refresh_every = settings.get("refresh_every", DefenseSettings.for_kind("gradient").refresh_every)
    rounds = args.rounds or refresh_every * (3 if args.quick else 10)
    res = measure(rounds, args.warmup, args.seed, settings=settings, model=args.model)
    print(f"{res['model']}, batch {BATCH}, {res['threads']} thread(s), {res['steps_measured']} measured steps each "
          f"after {args.warmup} warm-up rounds (incl. the first cold spectrum estimate and torch.func warm-up)")
    ms = res["plain_step_ms"]
    print(f"  plain step (median)                {ms:8.2f} ms   1.00x")
    print(f"  defended, amortised per step       {res['defended_over_plain'] * ms:8.2f} ms   "
          f"{res['defended_over_plain']:.2f}x   (refresh every {refresh_every} steps)")
    print(f"  defended, step between refreshes   {res['defended_step_over_plain'] * ms:8.2f} ms   "
          f"{res['defended_step_over_plain']:.2f}x")
    print(f"  defended, refresh step             {res['defended_refresh_step_over_plain'] * ms:8.2f} ms   "
          f"{res['defended_refresh_step_over_plain']:.2f}x")
    print(f"  Opacus DP-SGD step                 {res['opacus_over_plain'] * ms:8.2f} ms   "
          f"{res['opacus_over_plain']:.2f}x")
    print(f"  (means over all measured steps: defended {res['defended_mean_over_plain_mean']:.2f}x, "
          f"Opacus {res['opacus_mean_over_plain_mean']:.2f}x)")
    if res["fallbacks"]:
        print(f"  note: {res['fallbacks']} defended step(s) fell back to conservative isotropic noise")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
