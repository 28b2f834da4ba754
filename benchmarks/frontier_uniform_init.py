"""Frontier study: best-attack PSNR of spectral vs isotropic gradient noise at equal energy, and its accuracy cost.

    python benchmarks/frontier_uniform_init.py --quick      # 16x16x3 patches, 6 samples, 10 training epochs
    python benchmarks/frontier_uniform_init.py              # 32x32x3 patches (exact SVD of J per sample), 8 samples, 20 epochs

Setting (THEORY §4): DLG's LeNet-sigmoid at uniform init, one natural RGB patch per shared gradient (batch 1),
labels known to the attacker. For every relative noise energy ``E`` (noise energy / ‖g‖²; default sweep 1e-3, 1e-2, 1e-1, 1) and
every placement, one noisy release ``g̃ = g + δ`` is attacked by

* DLG (L2 matching, float64 L-BFGS) and Inverting Gradients (cosine + TV, Adam, signed gradient) — the
  "best attack" of a sample is the higher PSNR of the two;
* the defense-aware MAP attacker (:func:`invdefend.attacks.defense_aware_gradient_attack`), which knows the
  placement's exact noise covariance and whitens by it (Gaussian pixel prior, float64 L-BFGS).

Placements (``J = U diag(s) Vᵀ`` is the per-sample gradient Jacobian ∂g/∂x, its exact SVD taken offline here):

* ``isotropic``: ``δ ~ N(0, σ² I_m)``, ``mσ² = E‖g‖²``;
* ``weak25``: isotropic inside the span of the left singular vectors of the weakest quarter of range(J);
* ``band_pass``: variance ``∝ s_i²/(s_i² + μ)²`` along ``u_i`` (the law of ``J (JᵀJ + μ)⁻¹ w``, what
  :func:`invdefend.placements.band_pass.band_pass_noise` draws without an SVD), ``μ`` = 25th percentile of ``s²``;
* ``hybrid50`` / ``hybrid25``: 50 % / 25 % of the energy isotropic, the rest band-pass;
* ``topk_wf``: ``GradientDefense(mechanism="spectral")``, water-filling on the top-16 directions.

The default sweep runs ``isotropic``, ``band_pass``, ``hybrid50`` and ``hybrid25``; ``--placements`` picks others.

Every spectral placement is scaled to the same expected energy ``E‖g‖²`` as the isotropic noise.

Recommended setting: the smallest energy of the sweep at which a spectral placement keeps ≥ 95 % of the
samples at or below 12 dB against the best attack (DLG, IG) *and* the defense-aware attacker reconstructs
no better from it than from isotropic noise of the same energy (so no placement the defense-aware attacker
whitens away is ever recommended); ties go to the lower mean PSNR. ``frac_below_12db`` is that share;
``frac_below_12db_incl_defense_aware`` counts the defense-aware attacker too.

Accuracy: LeNet-relu on scikit-learn's digits (8x8), SGD, batch 32, trained undefended, with isotropic noise
and with the recommended placement at the recommended energy, each drawn by the library's
:class:`~invdefend.defense.GradientDefense` wrapped around the optimizer (``mechanism="isotropic"``, or
``mechanism="band_pass"`` with the isotropic share as ``floor=``; energy relative to the batch-mean
gradient), same seeds; ``acc_drop_pp`` is undefended minus defended test accuracy, in points, averaged over
the seeds.

The last line printed is one JSON object (see ``docs/frontier_uniform_init.md`` for every key).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invdefend.attacks import NoiseCovariance, defense_aware_gradient_attack, dlg, inverting_gradients
from invdefend.defense import GradientDefense
from invdefend.data import digits_split, natural_image_patches
from invdefend.jacobian import gradient_jacobian
from invdefend.allocation import placement_variances, water_filling
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_
from invdefend.risk import DEFAULT_RHO
from invdefend.spectral import exact_spectrum

PLACEMENTS = ("isotropic", "band_pass", "hybrid50", "hybrid25")  # the default sweep
CHOICES = PLACEMENTS + ("weak25", "topk_wf")
HYBRID_ISO = {"hybrid50": 0.5, "hybrid25": 0.25}  # share of the energy isotropic, the rest band-pass

TOPK = 16  # GradientDefense's default k
FALLBACK_STEPS: dict[str, int] = {}  # training steps released under fail-closed fallback noise, per placement
PROBES = 2  # samples of each batch whose own spectral basis carries the training noise


def _svd(net: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, U, s)``: the flat gradient and the left singular vectors/values of range(J) (rank-trimmed)."""
    op = gradient_jacobian(net, F.cross_entropy, x, y)
    g = op.values()[0].double()
    spec = exact_spectrum(op, dtype=torch.float64)
    U, s = spec.left_vectors[0], spec.singular_values[0]
    keep = s > s[0] * 1e-10
    return g, U[:, keep], s[keep]


def _covariance(placement: str, energy: float, U: Tensor, s: Tensor, m: int, gnorm2: float) -> NoiseCovariance:
    """The exact per-release noise covariance of ``placement`` at absolute energy ``energy``."""
    if placement == "isotropic":
        return NoiseCovariance(energy / m)
    if placement == "topk_wf":  # the current GradientDefense default: water-filling on the top-k directions
        ref = DEFAULT_RHO**2 * gnorm2 / m
        tau = water_filling(s[:TOPK].unsqueeze(0), energy, 1.0 / 12.0, ref)[0]
        nz = tau > 0
        return NoiseCovariance(0.0, U[:, :TOPK][:, nz], tau[nz])
    if placement in HYBRID_ISO:
        iso = HYBRID_ISO[placement]
        tau = placement_variances(s.unsqueeze(0), torch.tensor([(1 - iso) * energy], dtype=s.dtype), "band_pass")[0]
        nz = tau > 0
        return NoiseCovariance(iso * energy / m, U[:, nz], tau[nz])
    tau = placement_variances(s.unsqueeze(0), torch.tensor([energy], dtype=s.dtype), placement)[0]
    nz = tau > 0
    return NoiseCovariance(0.0, U[:, nz], tau[nz])


def _release(g: Tensor, cov: NoiseCovariance, gen: torch.Generator) -> Tensor:
    """One noisy release ``g + δ``, ``δ ~ N(0, Σ)`` of ``cov`` (isotropic part and low-rank part)."""
    out = g
    if cov.sigma2_iso > 0:
        out = out + math.sqrt(cov.sigma2_iso) * torch.randn(g.shape, generator=gen, dtype=g.dtype)
    if cov.basis is not None:
        w = torch.randn(cov.tau.shape, generator=gen, dtype=g.dtype) * cov.tau.sqrt()
        out = out + cov.basis @ w
    return out


def _attack(net, g_noisy, x, y, cov, args, seed: int, aware: bool) -> dict[str, float]:
    shape = tuple(x.shape)
    r1 = dlg(net, g_noisy, input_shape=shape, labels=y, iterations=args.dlg_iters, dtype=torch.float64, seed=seed)
    r2 = inverting_gradients(net, g_noisy.float(), input_shape=shape, labels=y, iterations=args.ig_iters,
                             tv_weight=1e-2, seed=seed)
    out = {"dlg": float(psnr(r1.reconstruction, x.double())), "ig": float(psnr(r2.reconstruction.double(), x.double()))}
    out["best"] = max(out["dlg"], out["ig"])
    if aware:
        r3 = defense_aware_gradient_attack(net, g_noisy, noise=cov, input_shape=shape, labels=y,
                                           iterations=args.aware_iters, seed=seed)
        out["aware"] = float(psnr(r3.reconstruction, x.double()))
        out["best_all"] = max(out["best"], out["aware"])
    return out


def _interp_energy(energies: list[float], curve: list[float], level: float) -> tuple[float, bool]:
    """Energy at which a (decreasing) PSNR curve reaches ``level``, log-linear; ``(value, exact)``.

    Outside the sweep it returns the sweep's largest energy and ``exact=False`` (a lower bound).
    """
    for i in range(len(energies) - 1):
        a, b = curve[i], curve[i + 1]
        if (a - level) * (b - level) <= 0 and a != b:
            t = (a - level) / (a - b)
            la, lb = math.log10(energies[i]), math.log10(energies[i + 1])
            return 10 ** (la + t * (lb - la)), True
    if curve[0] <= level:
        return energies[0], False
    return energies[-1], False


def defense_for(placement: str, energy: float, net: torch.nn.Module, seed: int) -> GradientDefense | None:
    """The library's :class:`GradientDefense` that trains with ``placement`` at relative energy ``energy``.

    ``isotropic`` → ``mechanism="isotropic"``; ``band_pass`` → ``mechanism="band_pass"``; ``hybridNN`` →
    ``mechanism="band_pass"`` with ``NN`` % of the energy as the isotropic ``floor``; ``topk_wf`` →
    ``mechanism="spectral"`` with ``k=16``. ``weak25`` has no library mechanism (``None``: the benchmark
    draws it from an exact SVD, see :func:`_batch_noise`).
    """
    common = dict(probes=PROBES, seed=seed, mode="eval")
    if placement == "isotropic":
        return GradientDefense(net, nn.CrossEntropyLoss(), mechanism="isotropic", budget=energy, **common)
    if placement == "band_pass":
        return GradientDefense(net, nn.CrossEntropyLoss(), mechanism="band_pass", budget=energy, **common)
    if placement in HYBRID_ISO:
        iso = HYBRID_ISO[placement]
        return GradientDefense(net, nn.CrossEntropyLoss(), mechanism="band_pass", budget=(1 - iso) * energy,
                               floor=iso * energy, **common)
    if placement == "topk_wf":
        return GradientDefense(net, nn.CrossEntropyLoss(), mechanism="spectral", budget=energy, k=TOPK, **common)
    return None


def _fallback_counter(placement: str):
    """A monitor callback adding the placement's fail-closed fallback releases to ``FALLBACK_STEPS``."""

    def count(record) -> None:
        FALLBACK_STEPS[placement] = FALLBACK_STEPS.get(placement, 0) + int(record.fallback)

    return count


def _train_digits(placement: str | None, energy: float, seed: int, epochs: int) -> float:
    """Test accuracy (%) of LeNet-relu on digits, trained with ``placement`` noise at relative ``energy``.

    The noise comes from the library's :class:`GradientDefense` (:func:`defense_for`), wrapped around the
    optimizer exactly as a user would; ``placement=None`` trains undefended.
    """
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_split(seed=0)
    net = LeNet(in_channels=1, image_size=8, activation="relu")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    params = [p for p in net.parameters() if p.requires_grad]
    defense = None if placement is None else defense_for(placement, energy, net, seed)
    if defense is not None:
        defense.monitor.subscribe(_fallback_counter(placement))
    criterion = defense.loss_fn if defense is not None else nn.CrossEntropyLoss()
    if defense is not None:
        opt = defense.wrap(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallbacks are counted by _fallback_counter (JSON)
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=gen)
            for start in range(0, len(xtr), 32):
                idx = perm[start : start + 32]
                xb, yb = xtr[idx], ytr[idx]
                opt.zero_grad()
                criterion(net(xb), yb).backward()
                if placement is not None and defense is None:  # weak25: exact-SVD noise drawn here
                    flat = torch.cat([p.grad.reshape(-1) for p in params])
                    noise = _batch_noise(net, xb, yb, flat, placement, energy, gen)
                    off = 0
                    for p in params:
                        p.grad.add_(noise[off : off + p.numel()].view_as(p).to(p.dtype))
                        off += p.numel()
                opt.step()
    if defense is not None:
        defense.detach()
    with torch.no_grad():
        return 100.0 * float((net(xte).argmax(1) == yte).float().mean())


def _batch_noise(net, xb: Tensor, yb: Tensor, flat: Tensor, placement: str, energy: float,
                 gen: torch.Generator) -> Tensor:
    """``weak25`` noise of relative energy ``energy`` (exactly) for a batch-mean gradient, in ``PROBES``
    samples' own bases from an exact SVD (no library mechanism draws it)."""
    target = energy * float(flat.double().pow(2).sum())
    probe = torch.randperm(len(xb), generator=gen)[:PROBES]  # as GradientDefense: a few probe samples
    op = gradient_jacobian(net, F.cross_entropy, xb[probe], yb[probe])
    spec = exact_spectrum(op, dtype=torch.float64)
    U, s = spec.left_vectors, spec.singular_values  # (B, m, d), (B, d)
    s = torch.where(s > s[:, :1] * 1e-10, s, torch.zeros_like(s))
    tau = placement_variances(s, torch.ones(s.shape[0], dtype=s.dtype), placement)
    w = torch.randn(tau.shape, generator=gen, dtype=torch.float64) * tau.sqrt()
    z = (U @ w.unsqueeze(-1)).squeeze(-1).sum(0)
    return z * math.sqrt(target / float(z.pow(2).sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16x16 patches, 6 samples (default 32x32, 8 samples)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--energies", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--dlg-iters", type=int, default=None)
    parser.add_argument("--ig-iters", type=int, default=None)
    parser.add_argument("--aware-iters", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for the accuracy figure")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the patches, the model's initialisation, the noise and the attacks' starts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--placements", nargs="+", choices=CHOICES, default=list(PLACEMENTS),
                        help="topk_wf = the current GradientDefense default (water-filling on the top-16 directions)")
    parser.add_argument("--no-train", action="store_true", help="skip the digits accuracy runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.samples or (6 if args.quick else 8)
    size = args.size or (16 if args.quick else 32)
    args.dlg_iters = args.dlg_iters or (300 if args.quick else 1000)
    args.ig_iters = args.ig_iters or (300 if args.quick else 1000)
    args.aware_iters = args.aware_iters or (200 if args.quick else 500)
    epochs = args.epochs or (10 if args.quick else 20)
    energies = sorted(args.energies)
    placements = list(dict.fromkeys(args.placements))
    spectral = [p for p in placements if p != "isotropic"]
    if "isotropic" not in placements or not spectral:
        parser.error("--placements needs 'isotropic' and at least one spectral placement to compare with")
    t0 = time.perf_counter()

    xs = natural_image_patches(n, size=size, seed=args.seed)
    net = uniform_init_(LeNet(image_size=size), generator=torch.Generator().manual_seed(args.seed))
    results: dict[str, dict[float, list[dict[str, float]]]] = {p: {e: [] for e in energies} for p in placements}
    for i in range(n):
        x, y = xs[i : i + 1], torch.tensor([i % 10])
        g, U, s = _svd(net, x, y)
        gnorm2 = float(g.pow(2).sum())
        for e in energies:
            for p in placements:
                cov = _covariance(p, e * gnorm2, U, s, g.numel(), gnorm2)
                g_noisy = _release(g, cov, torch.Generator().manual_seed(10_000 * i + 7 + 1_000_000 * args.seed))
                r = _attack(net, g_noisy, x, y, cov, args, seed=i + 1000 * args.seed, aware=True)
                results[p][e].append(r)
                print(f"sample {i} E={e:g} {p:10s} " + " ".join(f"{k}={v:.1f}" for k, v in r.items()),
                      file=sys.stderr, flush=True)

    def curve(p: str, key: str) -> list[float]:
        return [statistics.fmean(r[key] for r in results[p][e]) for e in energies]

    curves = {p: {k: curve(p, k) for k in ("best", "aware", "best_all")} for p in placements}

    def frac12(p: str, e: float, key: str = "best") -> float:
        """Share of samples whose ``key`` attack PSNR stays <= 12 dB (``best``: the best of DLG and IG)."""
        return statistics.fmean(float(r[key] <= 12.0) for r in results[p][e])

    def admissible(p: str, e: float) -> bool:
        """The defense-aware attacker reads ``p`` no better than it reads isotropic noise of the same energy."""
        j = energies.index(e)
        return curves[p]["aware"][j] <= curves["isotropic"]["aware"][j]

    # recommended: the smallest energy of the sweep at which a spectral placement keeps >= 95 % of samples
    # <= 12 dB against the best attack (DLG, IG) while the defense-aware attacker does no better on it than
    # on isotropic noise; among those, the lowest mean best-attack PSNR. Else the largest energy, and the
    # admissible placement (or any, if none is) with the lowest mean best-attack PSNR there.
    candidates = [(e, curves[p]["best"][energies.index(e)], p) for e in energies for p in spectral
                  if frac12(p, e) >= 0.95 and admissible(p, e)]
    if candidates:
        rec_e, _, rec_p = min(candidates)
    else:
        rec_e = energies[-1]
        pool = [p for p in spectral if admissible(p, rec_e)] or spectral
        rec_p = min(pool, key=lambda p: curves[p]["best"][-1])
    j = energies.index(rec_e)
    gap = curves["isotropic"]["best"][j] - curves[rec_p]["best"][j]
    gaps = {p: {k: [round(a - b, 2) for a, b in zip(curves["isotropic"][k], curves[p][k])] for k in ("best", "aware")}
            for p in spectral}
    gap_aware = curves["isotropic"]["aware"][j] - curves[rec_p]["aware"][j]
    e_iso, exact = _interp_energy(energies, curves["isotropic"]["best"], curves[rec_p]["best"][j])
    attack_seconds = time.perf_counter() - t0

    acc = {"undefended": [], "isotropic": [], rec_p: []}
    for seed in range(0 if args.no_train else args.seeds):
        acc["undefended"].append(_train_digits(None, 0.0, seed, epochs))
        acc["isotropic"].append(_train_digits("isotropic", rec_e, seed, epochs))
        acc[rec_p].append(_train_digits(rec_p, rec_e, seed, epochs))
    acc_mean = {k: statistics.fmean(v) if v else float("nan") for k, v in acc.items()}

    for p in placements:
        print(f"{p:10s} best(DLG,IG) " + " ".join(f"{e:g}:{v:5.1f}" for e, v in zip(energies, curves[p]["best"]))
              + " | aware " + " ".join(f"{e:g}:{v:5.1f}" for e, v in zip(energies, curves[p]["aware"])))
    summary = {
        "psnr_gap_db_equal_energy": round(gap, 2),
        "psnr_gap_db_equal_energy_defense_aware": round(gap_aware, 2),
        "energy_ratio_equal_psnr": round(e_iso / rec_e, 2),
        "energy_ratio_is_lower_bound": not exact,
        "frac_below_12db": round(frac12(rec_p, rec_e), 3),
        "frac_below_12db_incl_defense_aware": round(frac12(rec_p, rec_e, "best_all"), 3),
        "acc_drop_pp": round(acc_mean["undefended"] - acc_mean[rec_p], 2),
        "recommended": {"placement": rec_p, "relative_energy": rec_e},
        "energies": energies,
        "curves_mean_psnr_db": {p: {k: [round(v, 2) for v in c] for k, c in cv.items()} for p, cv in curves.items()},
        "psnr_gap_db_by_energy": gaps,
        "frac_below_12db_by_energy": {p: [round(frac12(p, e), 3) for e in energies] for p in placements},
        "frac_below_12db_incl_defense_aware_by_energy": {p: [round(frac12(p, e, "best_all"), 3) for e in energies]
                                                         for p in placements},
        "accuracy_pct": {k: [round(a, 2) for a in v] for k, v in acc.items()},
        "acc_drop_pp_isotropic": round(acc_mean["undefended"] - acc_mean["isotropic"], 2),
        "training_fallback_steps": dict(FALLBACK_STEPS),
        "n_samples": n,
        "seed": args.seed,
        "image_size": size,
        "iterations": {"dlg": args.dlg_iters, "ig": args.ig_iters, "aware": args.aware_iters},
        "epochs": epochs,
        "seeds": args.seeds,
        "attack_seconds": round(attack_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
