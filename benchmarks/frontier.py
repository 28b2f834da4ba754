"""Frontier study: the default placement against isotropic noise, at equal accuracy and at equal energy, on the
strongest attack of the suite (the prior-using defense-aware attacker with the placement's exact noise law, and
Inverting Gradients), on two offline tasks, batch 1 and batch 8.

    python benchmarks/frontier.py --quick     # photos (LeNet-ReLU) + digits (LeNet-ReLU), 2 workers, < 45 min
    python benchmarks/frontier.py --quick --no-decoder   # without the learned decoder: 491 s instead of 1294 s
    python benchmarks/frontier.py             # adds the sigmoid LeNet and the small ResNet, more samples/seeds

Tasks (both ship with the install, nothing is downloaded):

* ``photos``: 32×32×3 patches of the photographs scikit-learn and scikit-image ship, labelled by the photo they
  were cut from (9 classes). Training data and the attacker's auxiliary data (its prior) come from the left half
  of every photo, the test set and the audited samples from the right half.
* ``digits``: scikit-learn's 8×8 digits; train split = training data and the attacker's auxiliary data, audited
  samples from the test split.

Placements, each drawn by the library itself (``GradientDefense`` around the release's gradient):

* ``isotropic``: ``mechanism="isotropic"``, relative energy ``E`` (``σ² = E‖g‖²/m``);
* ``default``: the candidate default, ``mechanism="spectral"`` with the data prior (weighted water-filling on the
  top-``k`` of the prior-whitened Jacobian, THEORY §8.5) at ``(1 − F)·E`` plus an isotropic ``floor=F·E``: the
  same total energy ``E``. Here the defense holds the Gaussian prior fitted on the training data (what
  ``prior="online"`` converges to).

Attacks on every release, the model at initialisation (the attacker's best round); per sample the strongest
counts:

* the defense-aware MAP attack with the fitted prior and the **exact noise law** of the release
  (``defense.noise_law()``), float64 L-BFGS in whitened coordinates;
* Inverting Gradients (cosine + TV, signed Adam), which ignores the noise;
* at batch 1 (unless ``--no-decoder``): the learned gradient decoder (:func:`invdefend.attacks.train_gradient_decoder`),
  trained on ``--decoder-aux`` of the attacker's auxiliary samples with their gradients noised by the release's
  exact law, then refined by the aware MAP attack from its output (``gradient_decoder_attack(optimise=True)``).

Batch 8 releases are attacked as one batch (8 unknown images); each sample's PSNR is taken after matching
reconstructions to samples (:func:`invdefend.metrics.matched_psnr`).

Accuracy: the same architecture trained with Adam (lr 1e-3, batch 32), the optimizer wrapped by the defense,
undefended, isotropic and default at every sweep energy, the same seeds (paired); test accuracy mean over seeds.

Figures (last line, one JSON object):

* ``recommended_energy``: the largest sweep energy at which the default placement's accuracy drop is ≤ 1 point
  on every task (the smallest sweep energy when none is);
* ``acc_drop_pp``: per task, undefended − default accuracy at the recommended energy;
* ``psnr_gap_db_equal_accuracy``: the accuracy isotropic noise reaches at the recommended energy ``E*``; the
  energy at which the default placement reaches that accuracy (log-linear interpolation on its accuracy curve,
  made non-increasing; ``E*`` when the curves do not cross); isotropic mean best-attack PSNR at ``E*`` minus the
  default's at that energy (interpolated in log E), per task × model × batch; the headline is the smallest;
* ``energy_ratio_equal_psnr``: the isotropic energy (interpolated over the isotropic sweep) whose mean PSNR equals
  the default's at ``E*``, over ``E*``; the headline is the smallest (``>`` when the sweep ends first);
* ``psnr_gap_db_equal_energy`` at every sweep energy;
* ``frac_at_prior_level``: share of all audited samples (every task, model, batch) whose strongest-attack PSNR
  under the default at ``E*`` is within 1 dB of the PSNR of the attacker's prior-mean guess.

See ``docs/frontier.md`` for the measured figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch
from prior_placements import release, train

from invdefend.attacks import (
    defense_aware_gradient_attack,
    gradient_decoder_attack,
    train_gradient_decoder,
)
from invdefend.attacks.batched import batched_gradient_attack
from invdefend.data import PHOTOS, digits_split, photo_patches
from invdefend.defense import DefenseSettings
from invdefend.metrics import matched_psnr, psnr
from invdefend.models import LeNet, uniform_init_
from invdefend.prior import GaussianPrior

TARGETS = {"psnr_gap_db_equal_accuracy": 3.0, "energy_ratio_equal_psnr": 3.0, "frac_at_prior_level": 0.95,
           "acc_drop_pp": 1.0}


EPOCHS = {"photos": 8, "digits": 30}  # training epochs per task (Adam, batch 32)


@dataclass
class Task:
    """One task's data: training (= the attacker's auxiliary data), test, audited samples."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_audit: torch.Tensor
    y_audit: torch.Tensor
    classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """One sample's shape."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def load_task(name: str, audit: int, seed: int, train_size: int) -> Task:
    """The photos or digits task; ``audit`` samples to attack, disjoint from the training data."""
    if name == "photos":
        x_tr, y_tr = photo_patches(train_size, seed=seed, part="left")
        x_te, y_te = photo_patches(600, seed=seed + 11, part="right")
        x_au, y_au = photo_patches(audit, seed=seed + 7, part="right")
        return Task(name, x_tr, y_tr, x_te, y_te, x_au, y_au, len(PHOTOS))
    if name == "digits":
        x_tr, y_tr, x_te, y_te = digits_split(seed=seed)
        return Task(name, x_tr, y_tr, x_te, y_te, x_te[-audit:], y_te[-audit:], 10)
    raise ValueError(f"frontier: unknown task {name!r}; choose photos or digits")


def make_model(task: Task, arch: str, seed: int) -> torch.nn.Module:
    """``lenet_relu`` / ``lenet_sigmoid`` (DLG's uniform init) / ``resnet`` for the task's input shape."""
    torch.manual_seed(seed)
    c, h, _ = task.shape
    if arch == "resnet":
        from invdefend.models import SmallResNet

        return SmallResNet(in_channels=c, image_size=h, num_classes=task.classes)
    activation = arch.removeprefix("lenet_")
    model = LeNet(in_channels=c, image_size=h, num_classes=task.classes, activation=activation)
    if activation == "sigmoid":
        uniform_init_(model, generator=torch.Generator().manual_seed(seed))
    return model


def settings_for(placement: str, E: float, prior: GaussianPrior, args: argparse.Namespace) -> dict:
    """The GradientDefense settings of a placement at total relative energy ``E``: ``isotropic``, or the
    library's default placement (its defaults, with the data prior unless ``--default-prior none``; only the
    settings given on the command line are overridden)."""
    if placement == "isotropic":
        return {"mechanism": "isotropic", "budget": E}
    if placement == "default":
        chosen = {"budget": E, "prior": prior if args.default_prior == "data" else None}
        for name in ("k", "probes", "floor"):
            if getattr(args, name) is not None:
                chosen[name] = getattr(args, name) * E if name == "floor" else getattr(args, name)
        if args.floor is not None:
            chosen["budget"] = (1 - args.floor) * E
        return chosen
    raise ValueError(placement)


def per_sample_psnr(rec: torch.Tensor, x: torch.Tensor) -> list[float]:
    """PSNR of every sample of ``x`` against its matched reconstruction."""
    rec = rec.reshape(x.shape).float().clamp(0, 1)
    if len(x) == 1:
        return [float(psnr(rec[0], x[0]))]
    return [float(v) for v in matched_psnr(rec, x)]


def attack_job(job: tuple) -> list[dict]:
    """Attack every release of one audited batch: rows of per-sample PSNRs (aware, IG, best, prior mean)."""
    task, arch, batch, start, releases, prior, args = job
    torch.set_num_threads(1)
    model = make_model(task, arch, args.seed).eval()
    x, y = task.x_audit[start : start + batch], task.y_audit[start : start + batch]
    prior_psnr = per_sample_psnr(prior.mean.reshape(1, *task.shape).expand_as(x), x)
    flats, laws = [], []
    for i, (placement, E) in enumerate(releases):
        flat, law, _ = release(model, x, y, seed=args.seed * 7919 + start * 31 + i,
                               **settings_for(placement, E, prior, args))
        flats.append(flat)
        laws.append(law)
    ig = batched_gradient_attack(model, torch.stack(flats), y[None].expand(len(flats), -1), sample_shape=task.shape,
                                 iterations=args.ig_iterations, seed=args.seed)
    rows = []
    for i, (placement, E) in enumerate(releases):
        aware = defense_aware_gradient_attack(model, flats[i], noise=laws[i], input_shape=(batch, *task.shape),
                                              labels=y, prior=prior, iterations=args.map_iterations)
        p_aware = per_sample_psnr(aware.reconstruction, x)
        p_ig = per_sample_psnr(ig.reconstructions[i], x)
        p_dec = decoder_psnr(model, task, flats[i], laws[i], x, y, prior, args)
        for j in range(batch):
            rows.append({"task": task.name, "arch": arch, "batch": batch, "sample": start + j, "placement": placement,
                         "E": E, "aware": p_aware[j], "ig": p_ig[j], "decoder": p_dec[j],
                         "best": max(p_aware[j], p_ig[j], p_dec[j]), "prior": prior_psnr[j]})
    print(f"  attacked {task.name}/{arch} batch {batch} samples {start}-{start + batch - 1}: "
          f"{len(releases)} releases", flush=True)
    return rows


def decoder_psnr(model: torch.nn.Module, task: Task, flat: torch.Tensor, law, x: torch.Tensor, y: torch.Tensor,
                 prior: GaussianPrior, args: argparse.Namespace) -> list[float]:
    """At batch 1 (unless ``--no-decoder``): the learned decoder trained on the first ``--decoder-aux`` training samples'
    gradients noised by this release's exact law (2 fresh copies each), then refined by the aware MAP attack
    from its output; ``-inf`` per sample with ``--no-decoder`` or at a larger batch (the decoder inverts one
    sample's gradient)."""
    if not args.decoder or len(x) != 1:
        return [-math.inf] * len(x)
    n = min(args.decoder_aux, len(task.x_train))
    decoder = train_gradient_decoder(model, task.x_train[:n], task.y_train[:n], noise=law, noise_copies=2,
                                     prior=prior, seed=args.seed)
    rec = gradient_decoder_attack(decoder, flat, labels=y, optimise=True, iterations=args.map_iterations)
    return per_sample_psnr(rec.reconstruction, x)


def train_job(job: tuple) -> tuple[str, str, str, float, int, float]:
    """Test accuracy of the task's model trained with Adam (batch 32), wrapped by the placement (None: none)."""
    task, arch, placement, E, seed, prior, args = job
    torch.set_num_threads(1)
    settings = None if placement == "undefended" else settings_for(placement, E, prior, args)
    epochs = EPOCHS[task.name] if args.train_epochs is None else args.train_epochs
    acc, _ = train(task.x_train, task.y_train, task.x_test, task.y_test, epochs=epochs, seed=seed,
                   settings=settings, model=make_model(task, arch, seed))
    print(f"  trained {task.name}/{arch} {placement:<10} E={E:<6g} seed {seed}: {100 * acc:.1f} %", flush=True)
    return task.name, arch, placement, E, seed, acc


def interp_log(x: float, pts: list[tuple[float, float]]) -> float:
    """Piecewise-linear interpolation of ``pts`` (energy, value) in log energy, clamped at the ends."""
    pts = sorted(pts)
    if x <= pts[0][0]:
        return pts[0][1]
    for (e0, v0), (e1, v1) in itertools.pairwise(pts):
        if e0 <= x <= e1:
            f = (math.log(x) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return v0 + f * (v1 - v0)
    return pts[-1][1]


def energy_at(value: float, pts: list[tuple[float, float]]) -> tuple[float, bool]:
    """The energy at which a non-increasing curve ``pts`` (energy, value) falls to ``value`` (log-linear);
    ``(energy, True)`` when the curve is still above it at the sweep's largest energy (then a lower bound)."""
    pts = sorted(pts)
    run, curve = math.inf, []
    for e, v in pts:  # make it non-increasing: seed noise must not create crossings
        run = min(run, v)
        curve.append((e, run))
    if value >= curve[0][1]:
        return curve[0][0], False
    for (e0, v0), (e1, v1) in itertools.pairwise(curve):
        if v0 >= value >= v1:
            f = 0.0 if v0 == v1 else (v0 - value) / (v0 - v1)
            return math.exp(math.log(e0) + f * (math.log(e1) - math.log(e0))), False
    return curve[-1][0], True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=["photos", "digits"])
    parser.add_argument("--archs", nargs="+", default=None,
                        help="models (default quick: lenet_relu; full: lenet_relu lenet_sigmoid resnet)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--samples", type=int, default=None, help="audited samples per task (quick 16, full 32)")
    parser.add_argument("--energies", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--iso-energies", type=float, nargs="+", default=[0.03, 0.3, 3.0, 10.0],
                        help="extra isotropic energies (the equal-PSNR sweep)")
    parser.add_argument("--floor", type=float, default=None,
                        help="isotropic share of the default placement (default: the library's split)")
    parser.add_argument("-k", type=int, default=None, help="default: GradientDefense's")
    parser.add_argument("--probes", type=int, default=None, help="default: GradientDefense's")
    parser.add_argument("--default-prior", choices=["data", "none"], default="data",
                        help="the default placement's prior: the fitted data prior (what prior='online' converges "
                             "to) or none")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--map-iterations", type=int, default=None, help="quick 200, full 300")
    parser.add_argument("--ig-iterations", type=int, default=None, help="quick 600, full 1000")
    parser.add_argument("--train-epochs", type=int, default=None, help="default: photos 8, digits 30")
    parser.add_argument("--train-seeds", type=int, default=None, help="quick 4, full 6")
    parser.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True,
                        help="batch 1: the learned gradient decoder (trained with each release's noise law) refined "
                             "by the aware MAP attack is in the suite (default; --no-decoder leaves it out: 2.6x faster "
                             "in --quick, and optimistic for the default, since the decoder is the strongest "
                             "attack on most batch-1 releases)")
    parser.add_argument("--decoder-aux", type=int, default=1000, help="the decoder's auxiliary samples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    q = args.quick
    args.archs = args.archs or (["lenet_relu"] if q else ["lenet_relu", "lenet_sigmoid", "resnet"])
    n = args.samples or (16 if q else 32)
    args.map_iterations = args.map_iterations or (200 if q else 300)
    args.ig_iterations = args.ig_iterations or (600 if q else 1000)
    seeds = args.train_seeds or (4 if q else 6)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tasks = {name: load_task(name, n, args.seed, args.train_size) for name in args.tasks}
    priors = {name: GaussianPrior.fit(t.x_train, min(args.rank, t.x_train[0].numel())) for name, t in tasks.items()}
    energies = sorted(set(args.energies))
    iso_sweep = sorted(set(energies) | set(args.iso_energies))
    releases = [("isotropic", E) for E in iso_sweep] + [("default", E) for E in energies]

    train_jobs = [(t, a, "undefended", 0.0, s, priors[t.name], args) for t in tasks.values() for a in args.archs
                  for s in range(seeds)]
    train_jobs += [(t, a, p, E, s, priors[t.name], args) for t in tasks.values() for a in args.archs
                   for p in ("isotropic", "default") for E in energies for s in range(seeds)]
    attack_jobs = [(t, a, b, start, releases, priors[t.name], args) for t in tasks.values() for a in args.archs
                   for b in args.batches for start in range(0, n - b + 1, b)]
    jobs = [("attack", j) for j in attack_jobs] + [("train", j) for j in train_jobs]
    print(f"{len(attack_jobs)} attack jobs ({len(releases)} releases each), {len(train_jobs)} training runs, "
          f"{args.workers} workers", flush=True)
    with mp.get_context("spawn").Pool(args.workers) as pool:
        outs = pool.map(run_job, jobs, chunksize=1)
    rows = [r for kind, out in zip(jobs, outs) if kind[0] == "attack" for r in out]
    accs = [out for kind, out in zip(jobs, outs) if kind[0] == "train"]
    print(json.dumps(summarise(rows, accs, args, energies, iso_sweep, n, seeds, time.perf_counter() - t0)))


def run_job(job: tuple) -> object:
    """Pool entry: one attack or training job."""
    kind, payload = job
    return attack_job(payload) if kind == "attack" else train_job(payload)


def summarise(rows: list[dict], accs: list[tuple], args, energies, iso_sweep, n, seeds, seconds) -> dict:
    """The tables (printed) and the JSON figures."""
    acc: dict[tuple, float] = {}
    for key, group in itertools.groupby(sorted(accs, key=lambda a: a[:4]), key=lambda a: a[:4]):
        acc[key] = 100 * statistics.mean(a[5] for a in group)
    drops = {}  # (task, arch) -> E -> default drop
    for (task, arch, placement, E), a in sorted(acc.items()):
        if placement != "undefended":
            print(f"accuracy {task:<7}{arch:<14}{placement:<11}E={E:<6g}{a:6.2f} %  "
                  f"(undefended {acc[(task, arch, 'undefended', 0.0)]:.2f})")
        if placement == "default":
            drops.setdefault((task, arch), {})[E] = acc[(task, arch, "undefended", 0.0)] - a
    ok = [E for E in energies if all(d[E] <= TARGETS["acc_drop_pp"] for d in drops.values())]
    E_star = max(ok) if ok else min(energies)
    mean = {}
    for key, group in itertools.groupby(sorted(rows, key=lambda r: (r["task"], r["arch"], r["batch"], r["placement"],
                                                                   r["E"])),
                                        key=lambda r: (r["task"], r["arch"], r["batch"], r["placement"], r["E"])):
        g = list(group)
        mean[key] = {k: statistics.mean(r[k] for r in g) for k in ("best", "aware", "ig", "prior", "decoder")}
    settings = sorted({k[:3] for k in mean})
    per_setting, gaps_acc, ratios, at_prior = {}, [], [], []
    print(f"{'setting':<28}{'E':>7}{'iso best':>9}{'def best':>9}{'def aware':>10}{'def IG':>8}{'prior':>7}{'gap':>6}")
    for task, arch, b in settings:
        iso = [(E, mean[(task, arch, b, "isotropic", E)]["best"]) for E in iso_sweep]
        dfl = [(E, mean[(task, arch, b, "default", E)]["best"]) for E in energies]
        for E in energies:
            m_i, m_d = mean[(task, arch, b, "isotropic", E)], mean[(task, arch, b, "default", E)]
            print(f"{f'{task}/{arch}/b{b}':<28}{E:>7g}{m_i['best']:>9.1f}{m_d['best']:>9.1f}{m_d['aware']:>10.1f}"
                  f"{m_d['ig']:>8.1f}{m_d['prior']:>7.1f}{m_i['best'] - m_d['best']:>6.1f}")
        acc_iso = [(E, acc[(task, arch, "isotropic", E)]) for E in energies]
        acc_def = [(E, acc[(task, arch, "default", E)]) for E in energies]
        a_target = interp_log(E_star, acc_iso)
        E_d, bound = energy_at(a_target, acc_def)
        E_d = max(E_d, min(energies))
        gap_acc = interp_log(E_star, iso) - interp_log(E_d, dfl)
        p_def = interp_log(E_star, dfl)
        ratio, r_bound = energy_at(p_def, iso)
        gaps_acc.append(gap_acc)
        ratios.append((ratio / E_star, r_bound))
        rec = [r for r in rows if (r["task"], r["arch"], r["batch"], r["placement"]) == (task, arch, b, "default")
               and r["E"] == E_star]
        at_prior += [r["best"] <= r["prior"] + 1.0 for r in rec]
        per_setting[f"{task}/{arch}/batch{b}"] = {
            "psnr_gap_db_equal_accuracy": round(gap_acc, 2), "default_energy_equal_accuracy": round(E_d, 4),
            "default_energy_is_lower_bound": bound, "energy_ratio_equal_psnr": round(ratio / E_star, 2),
            "ratio_is_lower_bound": r_bound,
            "psnr_gap_db_equal_energy": {f"{E:g}": round(mean[(task, arch, b, 'isotropic', E)]['best']
                                                         - mean[(task, arch, b, 'default', E)]['best'], 2)
                                         for E in energies},
            "isotropic_best_psnr": {f"{E:g}": round(mean[(task, arch, b, 'isotropic', E)]['best'], 2)
                                    for E in iso_sweep},
            "default_best_psnr": {f"{E:g}": round(mean[(task, arch, b, 'default', E)]['best'], 2) for E in energies},
            "default_aware_psnr": {f"{E:g}": round(mean[(task, arch, b, 'default', E)]['aware'], 2)
                                   for E in energies},
            **({"default_decoder_psnr": {f"{E:g}": round(mean[(task, arch, b, 'default', E)]['decoder'], 2)
                                         for E in energies},
                "isotropic_decoder_psnr": {f"{E:g}": round(mean[(task, arch, b, 'isotropic', E)]['decoder'], 2)
                                           for E in iso_sweep},
                "decoder_strongest_share": round(statistics.mean(
                    r["decoder"] >= max(r["aware"], r["ig"]) for r in rows
                    if (r["task"], r["arch"], r["batch"]) == (task, arch, b)), 3)}
               if args.decoder and b == 1 else {}),
            "prior_mean_psnr": round(mean[(task, arch, b, 'default', E_star)]['prior'], 2),
        }
    worst_ratio = min(ratios)
    acc_drop = {task: round(max(d[E_star] for (t, _), d in drops.items() if t == task), 2)
                for task in sorted({t for t, _ in drops})}
    figures = {
        "psnr_gap_db_equal_accuracy": round(min(gaps_acc), 2),
        "energy_ratio_equal_psnr": round(worst_ratio[0], 2), "energy_ratio_is_lower_bound": worst_ratio[1],
        "frac_at_prior_level": round(sum(at_prior) / max(len(at_prior), 1), 3),
        "acc_drop_pp": acc_drop,
    }
    met = {
        "psnr_gap_db_equal_accuracy": figures["psnr_gap_db_equal_accuracy"] >= TARGETS["psnr_gap_db_equal_accuracy"],
        "energy_ratio_equal_psnr": figures["energy_ratio_equal_psnr"] >= TARGETS["energy_ratio_equal_psnr"],
        "frac_at_prior_level": figures["frac_at_prior_level"] >= TARGETS["frac_at_prior_level"],
        "acc_drop_pp": all(v <= TARGETS["acc_drop_pp"] for v in acc_drop.values()),
    }
    for key, value in figures.items():
        if key in met:
            print(f"{key:<30} {value}  target {TARGETS[key]}  {'met' if met[key] else 'MISSED'}")
    return {**figures, "targets_met": met, "recommended_energy": E_star,
            "default": {**DefenseSettings.for_kind("gradient").__dict__, "prior": args.default_prior,
                        **{n: getattr(args, n) for n in ("k", "probes") if getattr(args, n) is not None},
                        "floor_share": 0.5 if args.floor is None else args.floor},
            "per_setting": per_setting,
            "accuracy_pct": {f"{t}/{a}/{p}@{E:g}": round(v, 2) for (t, a, p, E), v in sorted(acc.items())},
            "samples_per_task": n, "train_seeds": seeds, "train_epochs": args.train_epochs or EPOCHS,
            "map_iterations": args.map_iterations, "ig_iterations": args.ig_iterations, "archs": args.archs,
            "decoder": args.decoder, "decoder_aux": args.decoder_aux if args.decoder else None,
            "tasks": args.tasks, "batches": args.batches, "quick": args.quick, "seconds": round(seconds, 1)}


if __name__ == "__main__":
    main()
