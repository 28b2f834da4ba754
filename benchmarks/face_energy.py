"""The demo's trade-off across noise energies: accuracy and the strongest attack on faces, per placement.

For each ``--budgets`` energy ``E`` it runs the demo's pipeline (:mod:`invdefend.demo`) without TensorBoard:
the face / non-face CNN trained undefended, with the library's default defense (``mechanism="spectral"``) and
with isotropic noise of the same energy, accuracy cross-validated over 5 folds; then ``--faces`` held-out faces'
batch-of-one gradients at the initial weights attacked by every attack of the demo (Inverting Gradients with
restarts, DLG, the defense-aware MAP attack with an i.i.d., a data and a face prior), strongest by SSIM. The
undefended run and the attacks on undefended releases do not depend on ``E``; they are repeated per energy
(same seeds, same figures) so that every row stands alone.

Printed: one line per energy and placement, then one JSON object (``rows``: budget, run, accuracy, SSIM mean and
max, attacked and predicted PSNR mean; ``average_face_ssim``: the SSIM of the average training face, the guess
of an attacker with a face prior and no gradient).

    python benchmarks/face_energy.py                       # E = 1, 5, 20, 60 (about 5 minutes on 2 cores)
    python benchmarks/face_energy.py --budgets 20 --faces 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from invdefend.demo import (
    DemoConfig,
    attack_faces,
    baseline_scores,
    summarize,
    train_folds,
)


def main() -> None:
    """Parse the options, run every energy, print the rows and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="1,5,20,60", help="comma-separated noise energies (default 1,5,20,60)")
    ap.add_argument("--faces", type=int, default=DemoConfig.faces,
                    help=f"held-out faces attacked (default {DemoConfig.faces}, the demo's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[dict[str, float | str]] = []
    baseline_ssim: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        for budget in (float(b) for b in args.budgets.split(",")):
            config = DemoConfig(out=out, budget=budget, faces=args.faces, seed=args.seed, reconstruct_probe=0)
            folds = train_folds(config)
            report = attack_faces(config, folds)
            baseline = baseline_scores(folds, report)
            baseline_ssim = baseline[2]
            summary = summarize(config, folds, report, baseline)
            for run in config.runs:
                s = summary[run]
                row = {"budget": budget, "run": run, "accuracy": s["accuracy"], "ssim_mean": s["ssim_mean"],
                       "ssim_max": s["ssim_max"], "attacked_psnr_mean": s["attacked_psnr_mean"],
                       "predicted_psnr_mean": s["predicted_psnr_mean"], "fallbacks": s["fallbacks"],
                       "reidentified": s["reidentified"], "reid_rank_median": s["reid_rank_median"]}
                rows.append(row)
                print(f"E={budget:g} {run:<11} accuracy {s['accuracy']:.1%}  strongest attack SSIM {s['ssim_mean']:.2f} "
                      f"(max {s['ssim_max']:.2f}), {s['attacked_psnr_mean']:.1f} dB; predicted "
                      f"{s['predicted_psnr_mean']:.1f} dB; re-identified {s['reidentified']:.0%}, median rank "
                      f"{s['reid_rank_median']:g} of {summary['average face']['gallery']}", flush=True)
    print(json.dumps({"benchmark": "face_energy", "faces": args.faces, "seed": args.seed, "rows": rows,
                      "average_face_ssim": sum(baseline_ssim) / len(baseline_ssim),
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
