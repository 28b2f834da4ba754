"""Prior-aware water-filling + isotropic floor against isotropic noise, at equal energy, on the strongest attacker.

    python benchmarks/prior_placements.py --quick     # 4 samples per LeNet (sigmoid, ReLU), one core
    python benchmarks/prior_placements.py             # 8 samples per LeNet

Setting: 32×32 RGB patches of the photographs that ship with scikit-learn / scikit-image (auxiliary data from
the left half of every photo, audited samples from the right half), LeNet at initialisation, batch 1 (one
release per sample). Each release is made by the library itself: ``GradientDefense`` wrapped around the
sample's gradient (``refresh_every=1``, ``probes=1``), with

* ``isotropic``: ``mechanism="isotropic"``, relative energy ``E`` (``σ² = E‖g‖²/m``), swept over
  ``--iso-energies`` so that the isotropic energy matching each placement's PSNR can be read off;
* ``prior_wf_floorF``: ``mechanism="spectral"`` with the data prior (``prior=``, the Gaussian fitted on the
  auxiliary patches: the weighted water-filling of THEORY §8.5 on the top-``k`` of ``J·A``) at budget
  ``(1 − F)·E`` plus an isotropic ``floor=F·E``: the same total energy ``E``.

Attacks on every release (the strongest per sample counts):

* the defense-aware MAP attack with the fitted prior and the **exact noise law** of the release
  (``defense.noise_law()``: ``σ²I + U diag(τ)Uᵀ``), float64 L-BFGS in whitened coordinates;
* Inverting Gradients (cosine + TV, signed Adam, ``--ig-iterations``), which ignores the noise.

Accuracy (``--train-epochs``, default 4; ``--train-seeds`` 3): a ReLU LeNet trained with Adam, batch 32, on the
2000 auxiliary patches (9 photo classes), tested on 600 right-half patches, undefended, with isotropic noise
and with the first ``--floors`` share, at every ``--energies``; ``accuracy_pct`` holds the mean over seeds.

Figures (last line, one JSON object): for every placement and energy the mean strongest-attack PSNR, the
aware attack's, IG's and the defense's own predicted PSNR (its risk record); ``psnr_gap_db`` (isotropic −
placement at the same ``E``) and ``energy_ratio_equal_psnr`` (the isotropic energy, interpolated in log E over
the sweep, that reaches the placement's mean PSNR, divided by ``E``; a lower bound ``>`` when the sweep ends
first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from invdefend.attacks import defense_aware_gradient_attack
from invdefend.attacks.batched import batched_gradient_attack
from invdefend.data import PHOTOS, photo_patches
from invdefend.defense import GradientDefense
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_
from invdefend.prior import GaussianPrior

SHAPE = (3, 32, 32)


def build(activation: str, seed: int) -> torch.nn.Module:
    """LeNet for the photo classes at initialisation (sigmoid: DLG's uniform init)."""
    torch.manual_seed(seed)
    model = LeNet(num_classes=len(PHOTOS), activation=activation)
    if activation == "sigmoid":
        uniform_init_(model, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def release(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **settings) -> tuple[torch.Tensor, object, float]:
    """One defended release of ``(x, y)`` (``GradientDefense(**settings)``, refreshed on it): the flat noisy
    gradient, its noise law and the recorded predicted PSNR."""
    defense = GradientDefense(model, F.cross_entropy, refresh_every=1, **settings)
    model.zero_grad(set_to_none=True)
    defense.capture(x, y)
    F.cross_entropy(model(x), y).backward()
    record = defense.protect()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().clone()
    model.zero_grad(set_to_none=True)
    return flat, defense.noise_law(), max(record.predicted_psnr)


def attack(model, flat, law, x, y, prior, args) -> tuple[float, float]:
    """PSNR of the aware MAP attack (exact law, fitted prior) and of Inverting Gradients."""
    aware = defense_aware_gradient_attack(model, flat, noise=law, input_shape=(1, *SHAPE), labels=y, prior=prior,
                                          iterations=args.map_iterations)
    ig = batched_gradient_attack(model, flat[None], y[None], sample_shape=SHAPE, iterations=args.ig_iterations,
                                 seed=args.seed)
    p_aware = float(psnr(aware.reconstruction.reshape(SHAPE).float().clamp(0, 1), x[0]))
    p_ig = float(psnr(ig.reconstructions[0, 0], x[0]))
    return p_aware, p_ig


def train(x, y, x_te, y_te, *, epochs: int, seed: int, settings: dict | None,
          model: torch.nn.Module | None = None) -> tuple[float, list]:
    """Test accuracy of ``model`` (default: a ReLU LeNet for the photo classes, seeded by ``seed``) trained
    with Adam (lr 1e-3, batch 32), its optimizer wrapped by ``GradientDefense(**settings)`` (None:
    undefended), and the defense's record of every step. Sample ids go to ``capture``, so the records count
    releases (the noise of a fixed budget is the same either way; target mode sizes it on the count)."""
    if model is None:
        torch.manual_seed(seed)
        model = LeNet(num_classes=len(PHOTOS), activation="relu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    defense = None
    if settings is not None:
        defense = GradientDefense(model, F.cross_entropy, seed=seed, **settings)
        opt = defense.wrap(opt)
    records = []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(perm), 32):
            idx = perm[start : start + 32]
            opt.zero_grad()
            if defense is not None:
                defense.capture(x[idx], y[idx], ids=idx)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if defense is not None:
                records.append(defense.last_record)
    model.eval()
    with torch.no_grad():
        return float((model(x_te).argmax(1) == y_te).float().mean()), records


def energy_ratio(target: float, E: float, iso: dict[float, float]) -> tuple[float, bool]:
    """The isotropic energy whose mean PSNR equals ``target`` (log-linear interpolation over the sweep), over
    ``E``; ``(ratio, True)`` when the sweep's largest energy still attacks better (then a lower bound)."""
    pts = sorted(iso.items())
    for (e0, p0), (e1, p1) in itertools.pairwise(pts):
        if p0 >= target >= p1:
            f = 0.0 if p0 == p1 else (p0 - target) / (p0 - p1)
            return math.exp(math.log(e0) + f * (math.log(e1) - math.log(e0))) / E, False
    if target >= pts[0][1]:
        return pts[0][0] / E, False
    return pts[-1][0] / E, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="default quick 4, full 8")
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "relu"])
    parser.add_argument("--energies", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--iso-energies", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--floors", type=float, nargs="+", default=[0.5, 0.25], help="isotropic shares F")
    parser.add_argument("-k", type=int, default=48, help="directions the spectral placement tracks")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--aux", type=int, default=2000)
    parser.add_argument("--map-iterations", type=int, default=300)
    parser.add_argument("--ig-iterations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-epochs", type=int, default=4, help="accuracy runs (0: none)")
    parser.add_argument("--train-seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    n = args.samples if args.samples is not None else (4 if args.quick else 8)
    acts = args.activations
    x_aux, _ = photo_patches(args.aux, seed=args.seed, part="left")
    prior = GaussianPrior.fit(x_aux, args.rank)
    x_all, y_all = photo_patches(max(n, 1), seed=args.seed + 7, part="right")
    results: dict = {}
    for act in acts if n > 0 else []:  # --samples 0: accuracy only
        model = build(act, args.seed)
        rows: dict[str, list[tuple[float, float, float]]] = {}
        placements = [("isotropic", E, {"mechanism": "isotropic", "budget": E, "prior": prior, "k": args.k})
                      for E in args.iso_energies]  # the prior only prices the record here
        placements += [(f"prior_wf_floor{F_:g}", E, {"mechanism": "spectral", "budget": (1 - F_) * E,
                                                     "floor": F_ * E, "prior": prior, "k": args.k})
                       for F_ in args.floors for E in args.energies]
        for i in range(n):
            x, y = x_all[i : i + 1], y_all[i : i + 1]
            for name, E, settings in placements:
                flat, law, pred = release(model, x, y, seed=args.seed * 1000 + i, probes=1, **settings)
                p_aware, p_ig = attack(model, flat, law, x, y, prior, args)
                rows.setdefault(f"{name}@{E:g}", []).append((max(p_aware, p_ig), p_aware, p_ig, pred))
                print(f"{act} sample {i} {name:<18} E={E:<5g} aware {p_aware:5.1f}  IG {p_ig:5.1f}  "
                      f"predicted {pred:5.1f}", flush=True)
        means = {key: [statistics.mean(r[j] for r in v) for j in range(4)] for key, v in rows.items()}
        iso = {E: means[f"isotropic@{E:g}"][0] for E in args.iso_energies}
        out = {}
        for F_ in args.floors:
            name = f"prior_wf_floor{F_:g}"
            for E in args.energies:
                best, aware, ig, pred = means[f"{name}@{E:g}"]
                ratio, bound = energy_ratio(best, E, iso)
                out[f"{name}@{E:g}"] = {
                    "best_psnr": round(best, 2), "aware_psnr": round(aware, 2), "ig_psnr": round(ig, 2),
                    "predicted_psnr": round(pred, 2), "isotropic_best_psnr": round(iso.get(E, float("nan")), 2),
                    "psnr_gap_db": round(iso.get(E, float("nan")) - best, 2),
                    "energy_ratio_equal_psnr": round(ratio, 2), "ratio_is_lower_bound": bound,
                }
        out["isotropic"] = {f"{E:g}": {"best_psnr": round(means[f'isotropic@{E:g}'][0], 2),
                                       "aware_psnr": round(means[f'isotropic@{E:g}'][1], 2),
                                       "predicted_psnr": round(means[f'isotropic@{E:g}'][3], 2)}
                            for E in args.iso_energies}
        results[act] = out
        print(f"{act}: {'placement':<24}{'best':>7}{'aware':>7}{'IG':>7}{'pred':>7}{'iso':>7}{'gap':>7}{'ratio':>8}")
        for key, v in out.items():
            if key != "isotropic":
                print(f"{act}: {key:<24}{v['best_psnr']:>7.1f}{v['aware_psnr']:>7.1f}{v['ig_psnr']:>7.1f}"
                      f"{v['predicted_psnr']:>7.1f}{v['isotropic_best_psnr']:>7.1f}{v['psnr_gap_db']:>7.1f}"
                      f"{('>' if v['ratio_is_lower_bound'] else '') + format(v['energy_ratio_equal_psnr'], '.2f'):>8}")
    accuracy: dict = {}
    if args.train_epochs > 0:  # batch 32, training patches = the auxiliary (left-half) patches, test = right half
        x_te, y_te = photo_patches(600, seed=args.seed + 11, part="right")
        _, y_aux = photo_patches(args.aux, seed=args.seed, part="left")
        runs = [("undefended", 0.0, None)]
        runs += [("isotropic", E, {"mechanism": "isotropic", "budget": E}) for E in args.energies]
        runs += [(f"prior_wf_floor{args.floors[0]:g}", E, {"mechanism": "spectral", "budget": (1 - args.floors[0]) * E,
                                                           "floor": args.floors[0] * E, "prior": prior, "k": args.k})
                 for E in args.energies]
        for name, E, settings in runs:
            accs = [train(x_aux, y_aux, x_te, y_te, epochs=args.train_epochs, seed=s, settings=settings)[0]
                    for s in range(args.train_seeds)]
            accuracy[f"{name}@{E:g}"] = round(100 * statistics.mean(accs), 2)
            print(f"accuracy {name:<18} E={E:<5g} {100 * statistics.mean(accs):6.2f} %  "
                  f"(seeds: {', '.join(f'{100 * a:.1f}' for a in accs)})", flush=True)
    print(json.dumps({"results": results, "accuracy_pct": accuracy, "samples": n, "k": args.k, "prior_rank": prior.rank,
                      "map_iterations": args.map_iterations, "ig_iterations": args.ig_iterations,
                      "quick": args.quick, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
