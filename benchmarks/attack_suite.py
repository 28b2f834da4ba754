"""The attack suite, side by side: each attack's undefended PSNR and its wall time per sample.

    python benchmarks/attack_suite.py --quick
    python benchmarks/attack_suite.py

Target (the same for every attack): LeNet-sigmoid (``invdefend.models.LeNet``, width 12) at DLG's uniform
init in [-0.5, 0.5] (seed ``--seed``), 32×32×3 natural patches (``natural_image_patches(n, seed=2)``), batch of
one, label ``i % 10``, the exact (undefended) per-sample gradient. The auxiliary data of the attackers that
learn or fit a prior is ``natural_image_patches(--aux, seed=1)`` minus every patch within 20 dB PSNR of a
target (overlapping windows of the same two photos), so it is disjoint from the targets.

Attacks, each as its authors intended (``--quick`` uses fewer iterations, printed in the JSON line):

* ``dlg`` — DLG (Zhu et al. 2019): L2 matching, L-BFGS, float64, soft labels optimised jointly;
  1000 iterations (quick 300).
* ``idlg`` — iDLG (Zhao et al. 2020): the label read off the last layer, then DLG; 1000 (quick 300).
* ``ig`` — Inverting Gradients (Geiping et al. 2020): cosine + TV (weight 1e-2), signed Adam (lr 0.1, step
  decay), box by clamping, 4000 iterations × 2 restarts, the lowest objective kept (quick: 1000 × 1), label
  from iDLG.
* ``map_prior`` — the defense-aware MAP attack with the Gaussian prior fitted on the auxiliary patches
  (rank 64), started at the prior mean, whitened coordinates, L-BFGS; the undefended release is modelled as
  tiny isotropic noise (energy 1e-10·‖g‖²), ``--map-tv`` TV weight (default 0: under a near-exact release
  the likelihood term dominates any TV weight that does not bias the optimum); 1000 iterations (quick 300).
* ``decoder`` — the learned decoder (ridge from the last layer's recovered input to the pixels, trained on
  the auxiliary patches' gradients with random labels), one matrix product per sample.
* ``decoder_map`` — the decoder's output refined by the same MAP attack (label from iDLG); 1000 iterations
  (quick 300).

Seconds per sample are the attack's own wall time (``AttackResult.seconds``) with one intra-op thread; the
one-off costs (fitting the prior, training the decoder) are reported separately. The attacks run
interleaved, target by target, so that machine load affects them alike. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from invdefend.attacks import (  # noqa: E402
    NoiseCovariance,
    defense_aware_gradient_attack,
    dlg,
    gradient_decoder_attack,
    idlg_attack,
    inverting_gradients,
    model_gradient,
    train_gradient_decoder,
)
from invdefend.data import natural_image_patches  # noqa: E402
from invdefend.metrics import psnr  # noqa: E402
from invdefend.models import LeNet, uniform_init_  # noqa: E402
from invdefend.prior import GaussianPrior  # noqa: E402

ATTACKS = ("dlg", "idlg", "ig", "map_prior", "decoder", "decoder_map")
THREAT = {
    "dlg": "weights, loss, exact gradient of one sample; label unknown (soft labels optimised)",
    "idlg": "weights, loss, exact gradient of one sample; label read off the last layer",
    "ig": "weights, loss, exact gradient of one sample (scale-free: cosine); label from iDLG; TV image prior",
    "map_prior": "weights, loss, label, gradient and its noise law; Gaussian prior fitted on disjoint aux data",
    "decoder": "weights, loss, gradient of one sample; aux data disjoint from the targets; no label needed",
    "decoder_map": "as decoder, plus label (iDLG) and MAP refinement with the fitted Gaussian prior",
}


def disjoint_aux(aux: torch.Tensor, targets: torch.Tensor, max_db: float = 20.0) -> torch.Tensor:
    """``aux`` minus every patch within ``max_db`` PSNR of a target (near-copies from overlapping windows)."""
    a, t = aux.flatten(1).double(), targets.flatten(1).double()
    closeness = -10 * torch.log10(torch.cdist(t, a).pow(2) / a.shape[1])
    kept = aux[closeness.max(dim=0).values < max_db]
    if float(torch.cdist(t, kept.flatten(1).double()).min()) <= 0:
        raise RuntimeError("attack_suite: a target is still in the auxiliary data")
    return kept


def main() -> None:
    """Run the suite and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 targets, fewer iterations (see the JSON line)")
    parser.add_argument("--targets", type=int, default=None, help="held-out patches (default quick 4, full 8)")
    parser.add_argument("--aux", type=int, default=None, help="auxiliary patches before de-duplication "
                        "(default quick 1000, full 2000)")
    parser.add_argument("--lbfgs-iterations", type=int, default=None, help="DLG, iDLG, MAP (quick 300, full 1000)")
    parser.add_argument("--ig-iterations", type=int, default=None, help="default quick 1000, full 4000")
    parser.add_argument("--ig-restarts", type=int, default=None, help="default quick 1, full 2")
    parser.add_argument("--map-tv", type=float, default=0.0, help="TV weight of the MAP attacks")
    parser.add_argument("--rank", type=int, default=64, help="rank of the fitted Gaussian prior")
    parser.add_argument("--cap-db", type=float, default=100.0, help="PSNR cap per sample (exact recovery is inf)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the victim's init")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    n_targets = args.targets or (4 if quick else 8)
    n_aux = args.aux or (1000 if quick else 2000)
    lbfgs_its = args.lbfgs_iterations or (300 if quick else 1000)
    ig_its = args.ig_iterations or (1000 if quick else 4000)
    ig_restarts = args.ig_restarts or (1 if quick else 2)
    t_start = time.perf_counter()

    targets = natural_image_patches(n_targets, seed=2).double()
    aux = disjoint_aux(natural_image_patches(n_aux, seed=1), targets)
    net = uniform_init_(LeNet(activation="sigmoid"), generator=torch.Generator().manual_seed(args.seed))
    aux_labels = torch.randint(0, 10, (aux.shape[0],), generator=torch.Generator().manual_seed(args.seed + 5))

    t0 = time.perf_counter()
    prior = GaussianPrior.fit(aux, args.rank)
    prior_seconds = time.perf_counter() - t0
    decoder = train_gradient_decoder(net, aux, aux_labels, prior=prior, seed=args.seed)
    decoder_seconds = float(decoder.info["seconds"])  # type: ignore[arg-type]
    print(f"victim LeNet-sigmoid uniform init (seed {args.seed}), {n_targets} targets; {aux.shape[0]} aux patches "
          f"(of {n_aux}); prior fit {prior_seconds:.1f} s, decoder training {decoder_seconds:.1f} s", flush=True)

    values: dict[str, list[float]] = {a: [] for a in ATTACKS}
    seconds: dict[str, list[float]] = {a: [] for a in ATTACKS}
    labels_ok: dict[str, list[bool]] = {"dlg": [], "idlg": [], "ig": [], "decoder_map": []}
    baseline: list[float] = []
    for i in range(n_targets):
        x, y = targets[i : i + 1], torch.tensor([i % 10])
        g = model_gradient(net, x, y, F.cross_entropy, dtype=torch.float64)
        tiny = NoiseCovariance(1e-10 * float(g.pow(2).sum()) / g.numel())
        baseline.append(float(psnr(prior.mean.reshape(x.shape).double(), x)[0]))
        order = ATTACKS[i % len(ATTACKS):] + ATTACKS[: i % len(ATTACKS)]  # rotate: no attack always runs first
        for name in order:
            if name == "dlg":
                r = dlg(net, g, input_shape=x.shape, labels=None, iterations=lbfgs_its, dtype=torch.float64, seed=i)
            elif name == "idlg":
                r = idlg_attack(net, g, input_shape=x.shape, iterations=lbfgs_its, dtype=torch.float64, seed=i)
            elif name == "ig":
                r = inverting_gradients(net, g.float(), input_shape=x.shape, labels=None, iterations=ig_its,
                                        restarts=ig_restarts, tv_weight=1e-2, seed=i)
            elif name == "map_prior":
                r = defense_aware_gradient_attack(net, g, noise=tiny, input_shape=x.shape, labels=y,
                                                  iterations=lbfgs_its, prior=prior, tv_weight=args.map_tv)
            elif name == "decoder":
                r = gradient_decoder_attack(decoder, g)
            else:
                r = gradient_decoder_attack(decoder, g, optimise=True, iterations=lbfgs_its, tv_weight=args.map_tv)
            values[name].append(min(float(psnr(r.reconstruction.double(), x)[0]), args.cap_db))
            seconds[name].append(r.seconds)
            if name in labels_ok and r.label is not None:
                labels_ok[name].append(bool(torch.equal(r.label.reshape(-1), y)))
        row = "  ".join(f"{a} {values[a][-1]:5.1f}" for a in ATTACKS)
        print(f"target {i}: prior mean {baseline[-1]:4.1f} | {row}", flush=True)

    def mean(v: list[float]) -> float:
        return float(sum(v) / len(v))

    print(f"\n| attack | undefended PSNR (dB, mean of {n_targets}) | min-max | s/sample | threat model |")
    print("|---|---|---|---|---|")
    for a in ATTACKS:
        print(f"| {a} | {mean(values[a]):.1f} | {min(values[a]):.1f}-{max(values[a]):.1f} | "
              f"{statistics.median(seconds[a]):.2f} | {THREAT[a]} |")
    print(f"| prior mean (no attack) | {mean(baseline):.1f} | {min(baseline):.1f}-{max(baseline):.1f} | - | - |")
    out = {
        "psnr": {a: round(mean(values[a]), 2) for a in ATTACKS},
        "psnr_per_target": {a: [round(v, 2) for v in values[a]] for a in ATTACKS},
        "seconds_per_sample": {a: round(statistics.median(seconds[a]), 3) for a in ATTACKS},
        "seconds_per_sample_mean": {a: round(mean(seconds[a]), 3) for a in ATTACKS},
        "labels_correct": {a: f"{sum(v)}/{len(v)}" for a, v in labels_ok.items()},
        "prior_mean_psnr": round(mean(baseline), 2),
        "one_off_seconds": {"prior_fit": round(prior_seconds, 2), "decoder_training": round(decoder_seconds, 2)},
        "settings": {
            "quick": quick, "targets": n_targets, "aux": int(aux.shape[0]), "aux_drawn": n_aux,
            "lbfgs_iterations": lbfgs_its, "ig_iterations": ig_its, "ig_restarts": ig_restarts,
            "map_tv": args.map_tv, "rank": args.rank, "seed": args.seed, "threads": torch.get_num_threads(),
            "cap_db": args.cap_db, "victim": "LeNet(sigmoid, width 12) uniform init [-0.5, 0.5]",
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    assert all(math.isfinite(v) for v in out["psnr"].values())  # type: ignore[union-attr]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
