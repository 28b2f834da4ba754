"""Regenerate the demo's picture for the README: ``docs/demo_faces.png``, from a run of ``invdefend demo`` at
its defaults (the same code path as the command), and print the run's table figures.

    python benchmarks/demo_picture.py                   # about 1 minute on 2 cores
    python benchmarks/demo_picture.py --out docs/demo_faces.png --seed 1

The last line printed is one JSON object: per run, accuracy, the strongest attack's mean SSIM and PSNR, InvRE's
predicted PSNR; the average face's SSIM; the demo's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from invdefend.demo import DemoConfig, run_demo


def main() -> None:
    """Run the demo into a temporary folder and copy its picture to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/demo_faces.png", help="where the picture goes (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo (default: %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(DemoConfig(out=tmp, seed=args.seed))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.files["picture"], args.out)
    keys = ("accuracy", "ssim_mean", "ssim_max", "attacked_psnr_mean", "predicted_psnr_mean", "step_time_ratio")
    runs = {name: {k: s[k] for k in keys if k in s} for name, s in result.summary.items()}
    print(json.dumps({"benchmark": "demo_picture", "picture": args.out, "seed": args.seed, "runs": runs,
                      "seconds": round(result.seconds, 1)}))


if __name__ == "__main__":
    main()
