"""A layer subset against the whole gradient on a width-16 ResNet-18 (issue 13; docs/theory.md §10.6).

``invdefend.models.ResNet18(width=16)`` (0.70 M parameters, BatchNorm on running statistics, eval mode) on
32×32×3 patches of the shipped photographs (``invdefend.data.photo_patches``), i.i.d. prior, one torch thread:

* **whole** — ``InvRE(model, loss, k=16, prior="iid")``: the top-16 spectrum of the whole gradient's Jacobian
  (plus the SLQ tail with ``--tail slq``, the default);
* **subset** — the same with ``params=["stages.3", "classifier"]`` (the last stage and the classifier, 0.53 M
  parameters): the top-16 spectrum of their gradient's Jacobian and the Lanczos upper estimate of the rest's
  ``‖J_R‖₂`` (20 steps, failure 1e-3 per sample), the risk bounded as in §10.6.

Each runs in its own spawned process (peak memory = that process's peak resident set, ``ru_maxrss``: Python,
torch and the model included), one sample at a time. Seconds are the estimate's (spectrum and, for the subset,
the rest's norm); the predicted PSNRs are then evaluated from the same estimates under the reference precision
alone and under isotropic noise of relative energy ``r`` (``σ² = r·‖g‖²/m`` per coordinate, ``g`` the whole
per-sample gradient), for the subset both with the bound and without it (the subset alone, optimistic).

The last line printed is one JSON object.

    python benchmarks/layer_subset.py                  # 2 samples, about 2 minutes on one thread
    python benchmarks/layer_subset.py --samples 4 --tail topk --params stem,stages.0,stages.1,stages.2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from scale import (  # benchmarks/ is on sys.path when a script here runs
    peak_gb,
    run_in_fresh_process,
)

SUBSET = ("stages.3", "classifier")
RELATIVE_NOISE = (0.0, 1e-4, 1e-2, 1.0, 100.0)


def _measure(which: str, samples: int, tail: str, rest_steps: int, subset: list[str], queue: Any) -> None:
    """Estimate one sample at a time; report seconds, peak memory and predicted PSNRs per noise level."""
    import torch
    from torch import nn

    from invdefend import InvRE, NoiseModel
    from invdefend.data import photo_patches
    from invdefend.models import ResNet18
    from invdefend.risk import RiskEstimate
    from invdefend.subset import RestBound, bounded_risk

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResNet18(width=16).eval()
    x, y = photo_patches(samples, seed=0)
    y = y % 10
    params = subset if which == "subset" else None
    invre = InvRE(model, nn.CrossEntropyLoss(), k=16, prior="iid", tail=tail, batch_size=1, params=params,
                  rest_steps=rest_steps)
    seconds, rest_seconds, rest_norms = [], [], []
    psnr, alone = {r: [] for r in RELATIVE_NOISE}, {r: [] for r in RELATIVE_NOISE}
    for i in range(samples):
        t0 = time.perf_counter()
        spec = invre.spectrum(x[i : i + 1], y[i : i + 1], left=False)
        t1 = time.perf_counter()
        rest = invre.rest_bound(x[i : i + 1], y[i : i + 1]) if params else None
        seconds.append(time.perf_counter() - t0)
        rest_seconds.append(time.perf_counter() - t1)
        whole2 = spec.signal_norm.double() ** 2 + (0.0 if rest is None else rest.signal_norm.double() ** 2)
        m = spec.out_dim + (0 if rest is None else rest.out_dim)
        for r in RELATIVE_NOISE:
            noise = NoiseModel(isotropic=(r * whole2 / m).float())
            if rest is None:
                risk = RiskEstimate.from_spectrum(spec, noise, tail=tail)
            else:
                risk = bounded_risk(spec, rest, noise, tail=tail)
                none = RestBound(rest.norm * 0, rest.ritz * 0, rest.signal_norm, rest.out_dim, 1.0, 0, rest.failure)
                alone[r].append(float(bounded_risk(spec, none, noise, tail=tail).predicted_psnr[0]))
            psnr[r].append(float(risk.predicted_psnr[0]))
        if rest is not None:
            rest_norms.append(float(rest.norm[0]))
    queue.put({"seconds_per_sample": sum(seconds) / samples, "seconds": seconds, "peak_gb": peak_gb(),
               "rest_seconds_per_sample": sum(rest_seconds) / samples if params else 0.0, "sweeps": spec.sweeps,
               "parameters": sum(p.numel() for p in model.parameters()), "rows": spec.out_dim,
               "psnr": {str(r): v for r, v in psnr.items()},
               "subset_alone_psnr": {str(r): v for r, v in alone.items()} if params else None,
               "rest_bound": rest_norms or None})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2, help="samples estimated (one at a time)")
    parser.add_argument("--tail", choices=("slq", "topk"), default="slq", help="InvRE's tail (default: slq)")
    parser.add_argument("--rest-steps", type=int, default=20, help="Lanczos steps of the rest's norm (default: 20)")
    parser.add_argument("--params", default=",".join(SUBSET),
                        help="the subset, comma-separated module or parameter names (default: %(default)s)")
    args = parser.parse_args(argv)
    subset = args.params.split(",")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"model": "ResNet18(width=16)", "params": subset, "samples": args.samples,
                           "tail": args.tail, "rest_steps": args.rest_steps, "threads": 1}
    for which in ("whole", "subset"):
        res = run_in_fresh_process(_measure, which, args.samples, args.tail, args.rest_steps, subset)
        out[which] = res
        print(f"{which}: {res['rows']} gradient rows, {res['seconds_per_sample']:.1f} s/sample (the rest's norm "
              f"{res['rest_seconds_per_sample']:.1f} s of it), peak {res['peak_gb']:.2f} GB", flush=True)
    for r in RELATIVE_NOISE:
        key = str(r)
        print(f"noise r={r:g}: predicted PSNR whole {_mean(out['whole']['psnr'][key]):.2f} dB, subset+bound "
              f"{_mean(out['subset']['psnr'][key]):.2f} dB, subset alone {_mean(out['subset']['subset_alone_psnr'][key]):.2f} dB")
    out["whole_s_per_sample"] = round(out["whole"]["seconds_per_sample"], 2)
    out["subset_s_per_sample"] = round(out["subset"]["seconds_per_sample"], 2)
    out["subset_rest_s_per_sample"] = round(out["subset"]["rest_seconds_per_sample"], 2)
    out["whole_peak_gb"] = round(out["whole"]["peak_gb"], 3)
    out["subset_peak_gb"] = round(out["subset"]["peak_gb"], 3)
    out["whole_psnr"] = round(_mean(out["whole"]["psnr"]["0.0"]), 2)
    out["subset_bound_psnr"] = round(_mean(out["subset"]["psnr"]["0.0"]), 2)
    out["subset_alone_psnr"] = round(_mean(out["subset"]["subset_alone_psnr"]["0.0"]), 2)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
