"""Batch-aware vs conservative per-sample risk of a batch-mean gradient, on DLG's LeNet (32x32x3) at init.

    python benchmarks/batch_risk.py               # B=4, i.i.d. prior, k=32/sample, top-k + 128-step quadrature
    python benchmarks/batch_risk.py --prior       # under a GaussianPrior fitted on 1024 other natural patches
    python benchmarks/batch_risk.py --validate    # also: the same estimate against the exact SVDs at 16x16

One batch of ``B`` natural patches; the per-sample risk of releasing its mean gradient, priced two ways
(:mod:`invdefend.batch_risk`): batch-aware (the rest of the batch unknown to the attacker, the Schur
complement) and conservative (each sample's own Jacobian, the rest known; today's InvRE/GradientDefense
treatment with the ``B²`` scaling), under the same release noise: the reference attacker precision
``τ_ref = (ρ·‖ḡ‖)²/m`` on the mean gradient (ρ = DEFAULT_RHO), plus isotropic noise of relative energy
``E·‖ḡ‖²`` for a few ``E``. Both spectra are top-k estimates with weighted Lanczos quadrature for the rest
(``tail="slq"``); the ``topk`` tail (a bound that over-states risk) is printed beside it.

Accuracy. ``f(λ) = τ/(τ+λ)`` is completely monotone, so each probe's Gauss (Lanczos) rule *under*-estimates
its share of InvLoss: quadrature over-states risk, and it does so more for the batch-aware risk (the joint
spectrum's weak end, where sample b's hidden directions live, is resolved last). Undefended (``τ = τ_ref``
tiny) this bias is large and shrinks slowly with the Lanczos steps, so the undefended gap printed is a
*lower* estimate of the true one; with isotropic noise (``E ≥ 1e-3``) the figures no longer move with the
steps. ``--validate`` measures it where the exact SVDs are affordable (LeNet at 16x16, float64).

Prints a table, then one JSON line: ``mean_psnr_gap_db`` (mean over samples of conservative − batch-aware
predicted PSNR, undefended, slq tail), the same per noise level, the predicted PSNRs, the gap to what
GradientDefense records today (``τ_ref`` from each sample's own ``‖g_b‖``), timings and settings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from invdefend.batch_risk import BatchRisk, batch_invloss
from invdefend.data import natural_image_patches
from invdefend.models import LeNet, uniform_init_
from invdefend.prior import GaussianPrior
from invdefend.risk import DEFAULT_RHO, NoiseModel


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def _validate(args: argparse.Namespace) -> dict[str, object]:
    """The same estimate against the exact (dense SVD) risks on LeNet at 16x16 in float64, undefended."""
    B = args.batch
    model = uniform_init_(LeNet(image_size=16), generator=torch.Generator().manual_seed(0)).double()
    x = natural_image_patches(B, size=16, seed=11, dtype=torch.float64)
    y = torch.arange(B) % 10
    t0 = time.perf_counter()
    exact = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(rho=DEFAULT_RHO), method="exact")
    exact_s = time.perf_counter() - t0
    est = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(rho=DEFAULT_RHO), k=args.k,
                        method="subspace", slq_probes=args.probes, slq_steps=args.steps, seed=args.seed)
    out = {
        "exact_mean_psnr_gap_db": _mean(exact.psnr_gap),
        "estimated_mean_psnr_gap_db": _mean(est.psnr_gap),
        "exact_psnr_batch_aware": _mean(exact.predicted_psnr_batch_aware),
        "estimated_psnr_batch_aware": _mean(est.predicted_psnr_batch_aware),
        "exact_psnr_conservative": _mean(exact.predicted_psnr_conservative),
        "estimated_psnr_conservative": _mean(est.predicted_psnr_conservative),
        "exact_seconds": exact_s,
    }
    print("validation, LeNet 16x16 float64, undefended (mean predicted PSNR, dB): batch-aware exact "
          f"{out['exact_psnr_batch_aware']:.2f} / estimated {out['estimated_psnr_batch_aware']:.2f}; conservative "
          f"exact {out['exact_psnr_conservative']:.2f} / estimated {out['estimated_psnr_conservative']:.2f}; gap exact "
          f"{out['exact_mean_psnr_gap_db']:.2f} / estimated {out['estimated_mean_psnr_gap_db']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=32, help="singular triplets per sample (joint spectrum: B·k)")
    parser.add_argument("--probes", type=int, default=4, help="quadrature probes per sample")
    parser.add_argument("--steps", type=int, default=128, help="Lanczos steps of the quadrature")
    parser.add_argument("--prior", action="store_true", help="a GaussianPrior fitted on 1024 other patches (rank 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate", action="store_true", help="also compare with the exact SVDs at 16x16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 leaves torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch
    model = uniform_init_(LeNet(), generator=torch.Generator().manual_seed(0))
    x = natural_image_patches(B, seed=11)
    y = torch.arange(B) % 10
    prior = GaussianPrior.fit(natural_image_patches(1024, seed=1234), rank=64) if args.prior else None

    t0 = time.perf_counter()
    risk = batch_invloss(model, F.cross_entropy, x, y, noise=NoiseModel(rho=DEFAULT_RHO), prior=prior, k=args.k,
                         method="subspace", tail="slq", slq_probes=args.probes, slq_steps=args.steps, seed=args.seed)
    seconds = time.perf_counter() - t0
    g2, m = risk.mean_gradient_norm**2, risk.settings["out_dim"]
    levels = {"undefended": risk}
    for energy in (1e-3, 1e-2, 1e-1):
        levels[f"E={energy:g}"] = risk.with_noise(NoiseModel(isotropic=energy * g2 / m, rho=DEFAULT_RHO))
    bounds: dict[str, BatchRisk] = {name: r.with_noise(r.noise, tail="topk") for name, r in levels.items()}

    print(f"LeNet-sigmoid (uniform init), B={B}, d={risk.settings['in_dim']}, m={m}, prior="
          f"{risk.settings['prior']}, k={args.k}/sample (joint {risk.joint_spectrum.k}), "
          f"sweeps joint {risk.joint_spectrum.sweeps} / per-sample {risk.spectrum.sweeps}, {seconds:.0f} s")
    print(f"joint top-k converged: {bool(risk.joint_spectrum.converged.all())}, per-sample: "
          f"{bool(risk.spectrum.converged.all())}")
    header = f"{'noise':<11} {'tail':<5} {'PSNR aware':>10} {'PSNR cons':>10} {'gap dB':>7} {'cons(own ref)':>13}"
    print(header)
    print("-" * len(header))
    for name, level in levels.items():
        for tail, r in (("slq", level), ("topk", bounds[name])):
            print(f"{name:<11} {tail:<5} {_mean(r.predicted_psnr_batch_aware):>10.2f} "
                  f"{_mean(r.predicted_psnr_conservative):>10.2f} {_mean(r.psnr_gap):>7.2f} "
                  f"{_mean(r.predicted_psnr_conservative_own_reference):>13.2f}")
    print("per sample (undefended, slq): gap dB", [round(v, 2) for v in risk.psnr_gap.double().tolist()])

    validation = _validate(args) if args.validate else None
    result = {
        "mean_psnr_gap_db": _mean(risk.psnr_gap),
        "min_psnr_gap_db": float(risk.psnr_gap.min()),
        "mean_psnr_gap_db_by_noise": {name: _mean(r.psnr_gap) for name, r in levels.items()},
        "mean_psnr_gap_db_topk_tail": {name: _mean(r.psnr_gap) for name, r in bounds.items()},
        "predicted_psnr_batch_aware": risk.predicted_psnr_batch_aware.double().tolist(),
        "predicted_psnr_conservative": risk.predicted_psnr_conservative.double().tolist(),
        "predicted_psnr_conservative_own_reference": risk.predicted_psnr_conservative_own_reference.double().tolist(),
        "mean_gap_to_todays_record_db": _mean(risk.predicted_psnr_conservative_own_reference
                                             - risk.predicted_psnr_batch_aware),
        "seconds": seconds,
        "joint_sweeps": risk.joint_spectrum.sweeps,
        "joint_converged": bool(risk.joint_spectrum.converged.all()),
        "per_sample_sweeps": risk.spectrum.sweeps,
        "batch": B, "k_per_sample": args.k, "slq_probes": args.probes, "slq_steps": args.steps,
        "prior": risk.settings["prior"], "rho": DEFAULT_RHO, "seed": args.seed,
        "model": "LeNet-sigmoid width 12, uniform init, 32x32x3 natural patches (seed 11)",
        "threads": torch.get_num_threads(),
        "validation_16x16": validation,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
