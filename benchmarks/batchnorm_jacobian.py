"""How far the three BatchNorm Jacobians of the gradient defense are from the function actually trained.

A small BatchNorm CNN (two 3x3 convolutions with BatchNorm and ReLU, average pooling to 4x4, a linear layer;
PyTorch's initialisation, train mode) on a batch of 32 natural 32x32x3 photo patches (scikit-learn's
photographs, :func:`invdefend.data.natural_image_patches`), random labels. For ``--probes`` samples of the
batch, three Jacobians of the released gradient with respect to the sample:

* ``batch``: the exact one, the rest of the batch held fixed (:func:`invdefend.jacobian.batch_gradient_jacobian`);
* ``frozen``: the batch's statistics held as constants (the defense's default, ``batch_norm="frozen"``);
* ``running``: eval mode on the running statistics, still at their initial values (``batch_norm="running"``).

Per probe: the relative error ``‖(J − J_batch) v‖ / ‖J_batch v‖`` over 8 random directions, the ratio of the
top singular values, and the predicted PSNR (top-8, i.i.d. prior ``v0 = 1/12``, reference precision, and
with isotropic noise of relative energy 0.01 on the batch-mean gradient) — each set against the exact
Jacobian's. The last line printed is one JSON object (means and worst cases over the probes).

    python benchmarks/batchnorm_jacobian.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from invdefend.data import natural_image_patches
from invdefend.jacobian import (
    batch_gradient_jacobian,
    batch_statistics,
    gradient_jacobian,
)
from invdefend.risk import NoiseModel, invloss, predicted_psnr
from invdefend.spectral import topk_spectrum

BATCH = 32


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 9),
    ).train()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, loss = build(args.seed), nn.CrossEntropyLoss()
    X = natural_image_patches(BATCH, seed=args.seed)
    Y = torch.randint(0, 9, (BATCH,), generator=torch.Generator().manual_seed(args.seed))
    idx = list(range(args.probes))
    ops = {
        "batch": batch_gradient_jacobian(model, loss, X, Y, idx),
        "frozen": gradient_jacobian(model, loss, X[idx], Y[idx], buffers=batch_statistics(model, X)),
        "running": gradient_jacobian(model, loss, X[idx], Y[idx]),
    }
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(args.probes, X[0].numel(), 8, generator=gen)
    images = {name: op.matvec(V) for name, op in ops.items()}
    out: dict = {"batch": BATCH, "probes": args.probes, "model": "BN CNN 3-16-32, 32x32x3 photo patches, init"}
    ref = images["batch"]
    spectra = {name: topk_spectrum(op, 8, oversample=4, max_sweeps=8, tol=1e-2, left=False,
                                   generator=torch.Generator().manual_seed(2)) for name, op in ops.items()}
    m = ops["batch"].out_dim
    energy = (ops["frozen"].values().norm(dim=1) ** 2).mean() / BATCH  # ~‖ḡ‖² scale for the noise level
    iso = float(0.01 * energy / m) * BATCH**2  # per-sample units (B² × noise on the mean gradient)
    psnr = {}
    for name, spec in spectra.items():
        clean = predicted_psnr(invloss(spec, NoiseModel(), v0=1 / 12, tail="topk"))
        noisy = predicted_psnr(invloss(spec, NoiseModel(isotropic=iso), v0=1 / 12, tail="topk"))
        psnr[name] = (clean, noisy)
    for name in ("frozen", "running"):
        rel = ((images[name] - ref).norm(dim=1) / ref.norm(dim=1)).mean(dim=1)
        top = spectra[name].singular_values[:, 0] / spectra["batch"].singular_values[:, 0]
        d_clean = psnr[name][0] - psnr["batch"][0]
        d_noisy = psnr[name][1] - psnr["batch"][1]
        out[name] = {
            "jacobian_rel_error_mean": round(float(rel.mean()), 4),
            "jacobian_rel_error_max": round(float(rel.max()), 4),
            "top_singular_value_ratio_mean": round(float(top.mean()), 4),
            "predicted_psnr_gap_db_mean": round(float(d_clean.mean()), 3),
            "predicted_psnr_gap_db_max_abs": round(float(d_clean.abs().max()), 3),
            "predicted_psnr_gap_db_noisy_mean": round(float(d_noisy.mean()), 3),
            "predicted_psnr_gap_db_noisy_max_abs": round(float(d_noisy.abs().max()), 3),
        }
        print(f"{name:>8}: Jacobian error {out[name]['jacobian_rel_error_mean']:.3f} (max "
              f"{out[name]['jacobian_rel_error_max']:.3f}), top singular value x{out[name]['top_singular_value_ratio_mean']:.3f}, "
              f"predicted PSNR gap {out[name]['predicted_psnr_gap_db_mean']:+.2f} dB undefended, "
              f"{out[name]['predicted_psnr_gap_db_noisy_mean']:+.2f} dB at E = 0.01", flush=True)
    out["batch_predicted_psnr_mean"] = round(float(psnr["batch"][0].mean()), 2)
    out["batch_predicted_psnr_noisy_mean"] = round(float(psnr["batch"][1].mean()), 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
