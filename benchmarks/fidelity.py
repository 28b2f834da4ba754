"""Fidelity of InvRE at 32×32×3: predicted PSNR against the strongest attack of the suite, per (sample, setting).

    python benchmarks/fidelity.py --quick          # ≤ 40 min on 2 cores (two worker processes)
    python benchmarks/fidelity.py                  # full: more samples, 4000 IG iterations, 2 restarts

Data: RGB 32×32 patches of the nine photographs scikit-learn and scikit-image ship (label = which photo).
The attacker's auxiliary data (the data prior, the trained models' training set) comes from the *left* half of
every photo, the audited samples from the *right* half: no pixel is in both.

Grid (settings): LeNet (DLG's CNN) with sigmoid and ReLU × at initialisation and trained (Adam on the auxiliary
patches) × no noise and isotropic noise of relative energy E ∈ {0.01, 0.1, 1} (σ² = E·‖ḡ‖²/m, ḡ the released
batch-mean gradient) × batch 1 and 4: 32 settings. Each audited sample is released in the 4 noise settings of its
(model, batch) group.

Attacks on every release (the strongest per sample decides, PSNR capped at ``--cap-db``):

* Inverting Gradients as its authors intended: cosine + TV, signed Adam, ``--ig-iterations`` (4000; quick 2000)
  with ``--restarts`` (2) random starts, the lowest objective kept;
* the defense-aware MAP attack: knows the noise variance and uses the fitted Gaussian image prior, L-BFGS in
  whitened coordinates (for the undefended release it takes a variance of ``1e-8·‖ḡ‖²/m``);
* the learned gradient decoder (:func:`invdefend.attacks.train_gradient_decoder`, unless ``--no-decoder``),
  trained for every noise law on ``--decoder-aux`` auxiliary patches whose gradients carry that law (2 fresh
  copies each; none when undefended), then refined by the MAP attack from its output
  (``gradient_decoder_attack(optimise=True)``). At batch 1 it attacks the release. At batch 4 it inverts one
  sample's gradient, so it attacks with the rest of the batch known (``--known-rest``, the default since
  2026-12-02): ``B·release − Σ_{c≠b} g_c = g_b + B·ε``, noise variance ``B²σ²``. That is the attacker the
  per-sample prediction below prices (colluding clients, or public samples in the batch); IG and MAP attack
  the batch without that knowledge;

(``invdefend.attacks.batched``: all releases of one model attacked at once.) Batch-4 reconstructions are matched
to the originals by the permutation with the best mean PSNR.

Predictions, per sample (per-sample units: for a batch of B the release is ``J_b x_b / B + ε``, priced as
``J_b x_b + B·ε`` with the other samples known — the conservative treatment):

* ``data_prior``: the sample-conditional InvLoss (:mod:`invdefend.conditional`) under the Gaussian prior fitted
  on the auxiliary patches (rank ``--rank``), from the prior-whitened spectrum (top-k + weighted quadrature);
* ``iid_prior``: today's InvLoss with ``v0 = 1/12`` from the spectrum of J.

Calibration. Each prior picks, per activation family (sigmoid networks, ReLU networks; ``--calibrate-per all``
for one pair overall), ``ρ`` (the attacker precision, :data:`invdefend.fidelity.RHO_GRID`) and ``κ`` (the
attacker's advantage over the linearised Gaussian model: it sees the noise variance divided by κ, from
:data:`KAPPA_GRID`): the pair with the least mean absolute error among those whose calibration coverage (a pair is
covered when its attack ≤ predicted + ``--calibration-margin-db``) reaches a target. Then both are frozen and the
held-out figures computed. Two sources:

* ``--calibration-source file`` (the default since 2026-12-02): ``(ρ, κ)`` frozen in
  ``benchmarks/fidelity_calibration.json``, fitted on *every* pair of separate calibration runs (other seeds:
  other samples, other trained models, another fitted prior) by
  ``--calibrate-from RUN …`` (files written by ``--save``). Its coverage target is chosen by leaving one run out
  (:func:`invdefend.fidelity.cross_validated_coverage`: the least of :data:`COVERAGE_CANDIDATES` at which every
  left-out run keeps coverage ≥ 0.95), because pairs of one run share its models and prior and are not
  exchangeable with a new run's. Every pair of the audited run is held out; a run whose samples are among the
  calibration runs' (SHA-1 of the pixels, stored in the file) is refused. The shipped file was fitted on seeds 0,
  4 and 5 (960 pairs), so the default ``--seed`` is 6.
* ``--calibration-source split`` (before 2026-12-02): the samples of every (model, batch) group are split into a
  calibration part and a disjoint held-out part (a sample is in one part for all its settings), and the
  calibration pairs must all be covered (``--coverage-target`` 1). With about 40 calibration pairs per family a
  held-out coverage ≥ 0.95 is at best an 87 % bet, and fresh seeds missed it.

``--save FILE`` keeps the attacks' raw results (with the seed and the samples' hashes) and ``--load FILE``
recomputes the calibration and figures from them without attacking again. The last line is one JSON object with,
for each prior, ``coverage`` (share of held-out pairs whose strongest-attack PSNR ≤ predicted + 1 dB),
``spearman_noisy``, ``spearman_undefended``, ``mae_db_noisy``, ``n_pairs``, ``n_settings``, ``rho``, ``kappa``,
``meets`` (which of the four targets hold) and ``calibration_confidence`` (per family,
:func:`invdefend.fidelity.coverage_confidence` of its calibration: the probability of a held-out coverage ≥ 0.95
for exchangeable pairs — optimistic, since pairs share a sample and a run; the left-out runs of the calibration
file are the honest measure). ``--hindsight`` adds a diagnostic never used to calibrate: how many per-family
(ρ, κ) of the grid, chosen with the held-out answers, would meet all four targets, and the best.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from invdefend.attacks import (
    NoiseCovariance,
    gradient_decoder_attack,
    train_gradient_decoder,
)
from invdefend.attacks.batched import batched_gradient_attack, release_gradients
from invdefend.conditional import conditional_invloss, estimate_conditional
from invdefend.data import PHOTOS, photo_patches
from invdefend.fidelity import (
    RHO_GRID,
    NoCoverageTarget,
    calibration_split,
    coverage_confidence,
    cross_validated_coverage,
)
from invdefend.jacobian import gradient_jacobian
from invdefend.metrics import psnr
from invdefend.models import LeNet, uniform_init_
from invdefend.prior import GaussianPrior
from invdefend.risk import NoiseModel, invloss, predicted_psnr
from invdefend.spectral import estimate_spectrum
from invdefend.stats import spearman

ENERGIES = (0.0, 0.01, 0.1, 1.0)
BATCHES = (1, 4)
KAPPA_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: A pair is covered when its strongest attack is at most this many dB above the prediction.
COVERAGE_MARGIN_DB = 1.0
#: The issue's held-out targets (MAE: at most; the others: at least).
TARGETS = {"coverage": 0.95, "spearman_noisy": 0.8, "spearman_undefended": 0.5, "mae_db_noisy": 3.0}
SHAPE = (3, 32, 32)
#: The frozen calibration: (ρ, κ) per prior and activation family, fitted on other runs (``--calibrate-from``).
CALIBRATION_FILE = Path(__file__).with_name("fidelity_calibration.json")
#: The calibration coverages ``--calibrate-from`` tries, leaving one run out (the least that keeps every
#: left-out run at the coverage target is used).
COVERAGE_CANDIDATES = (0.95, 0.96, 0.97, 0.98, 0.99, 1.0)


@dataclass(frozen=True)
class ModelSpec:
    """One victim model of the grid."""

    activation: str
    trained: bool

    @property
    def name(self) -> str:
        return f"{self.activation}-{'trained' if self.trained else 'init'}"


MODELS = (ModelSpec("sigmoid", False), ModelSpec("sigmoid", True), ModelSpec("relu", False), ModelSpec("relu", True))


def build_model(spec: ModelSpec, x_aux: Tensor, y_aux: Tensor, *, epochs: int, seed: int) -> torch.nn.Module:
    """LeNet for the 9 photo classes; sigmoid at DLG's uniform init, ReLU at PyTorch's; trained with Adam when
    the spec says so."""
    torch.manual_seed(seed)
    model = LeNet(num_classes=len(PHOTOS), activation=spec.activation)
    if spec.activation == "sigmoid":
        uniform_init_(model, generator=torch.Generator().manual_seed(seed))
    if spec.trained:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x_aux), generator=gen)
            for start in range(0, len(perm), 64):
                idx = perm[start : start + 64]
                opt.zero_grad()
                F.cross_entropy(model(x_aux[idx]), y_aux[idx]).backward()
                opt.step()
    return model.eval()


def matched_psnr(rec: Tensor, orig: Tensor, cap: float) -> list[float]:
    """Per-sample PSNR of a batch's reconstruction ``(B, ...)`` under the permutation with the best mean PSNR."""
    B = orig.shape[0]
    def score(a: Tensor, b: Tensor) -> float:
        v = float(psnr(a, b))
        return min(v, cap) if math.isfinite(v) else 0.0  # a failed (non-finite) reconstruction recovers nothing

    table = [[score(rec[j], orig[i]) for j in range(B)] for i in range(B)]
    best = max(itertools.permutations(range(B)), key=lambda p: sum(table[i][p[i]] for i in range(B)))
    return [table[i][best[i]] for i in range(B)]


def run_group(job: dict) -> dict:
    """Spectra and attacks of one (model, batch) group; runs in a worker process."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec: ModelSpec = job["spec"]
    model = LeNet(num_classes=len(PHOTOS), activation=spec.activation)
    model.load_state_dict(job["state"])
    model.eval()
    prior = GaussianPrior.from_state(job["prior"])
    x, y, B = job["x"], job["y"], job["batch"]
    n = x.shape[0]
    # --- predictions (per sample) ---
    op = gradient_jacobian(model, F.cross_entropy, x, y)
    gen = torch.Generator().manual_seed(job["seed"])
    k = job["k"]
    white = estimate_conditional(op, k, prior=prior, tail=True, slq_probes=8, slq_steps=32, generator=gen)
    plain = estimate_spectrum(op, k, tail=True, slq_probes=8, slq_steps=32, generator=gen)
    t_spec = time.perf_counter() - t0
    # --- releases: every noise level x every batch of the group ---
    xr = x.reshape(n // B, B, *SHAPE)
    yr = y.reshape(n // B, B)
    clean = release_gradients(model, xr, yr)  # (R, m)
    m = clean.shape[1]
    energy = clean.pow(2).sum(1)
    releases, labels, sigma2 = [], [], []
    noise_gen = torch.Generator().manual_seed(10_000 + job["seed"])
    for E in ENERGIES:
        s2 = E * energy / m
        releases.append(clean + s2.sqrt().unsqueeze(1) * torch.randn(clean.shape, generator=noise_gen))
        labels.append(yr)
        sigma2.append(s2)
    T = torch.cat(releases)
    L = torch.cat(labels)
    S2 = torch.cat(sigma2)
    ig = batched_gradient_attack(model, T, L, sample_shape=SHAPE, objective="cosine", tv_weight=job["tv"],
                                 iterations=job["ig_iterations"], restarts=job["restarts"], seed=job["seed"])
    # The MAP attack per noise level (L-BFGS shares one line search across the releases of a call)
    R = xr.shape[0]
    floor = 1e-8 * energy / m
    map_parts, map_seconds = [], 0.0
    for ei in range(len(ENERGIES)):
        sl = slice(ei * R, (ei + 1) * R)
        part = batched_gradient_attack(model, T[sl], L[sl], sample_shape=SHAPE, objective="map", prior=prior,
                                       noise_variance=torch.maximum(S2[sl], floor), tv_weight=0.0,
                                       iterations=job["map_iterations"], restarts=1, seed=job["seed"])
        map_parts.append(part.reconstructions)
        map_seconds += part.seconds
    map_recs = torch.cat(map_parts)
    p_dec, dec_seconds = decoder_psnrs(job, model, prior, T, L, S2, torch.maximum(S2, floor.repeat(len(ENERGIES))),
                                       xr)
    rows = []
    for ei, E in enumerate(ENERGIES):
        for r in range(R):
            idx = ei * R + r
            p_ig = matched_psnr(ig.reconstructions[idx], xr[r], job["cap"])
            p_map = matched_psnr(map_recs[idx], xr[r], job["cap"])
            for b in range(B):
                rows.append({"sample": r * B + b, "energy": E, "sigma2": float(S2[idx]), "ig": p_ig[b],
                             "map": p_map[b], "decoder": p_dec[idx][b]})
    # the vectors are not needed to price any noise level; keep what crosses the process boundary small
    white = replace(white, left_vectors=None, right_vectors=None)
    plain = replace(plain, left_vectors=None, right_vectors=None)
    return {
        "model": spec.name, "batch": B, "rows": rows, "white": white, "plain": plain,
        "seconds": {"spectra": t_spec, "ig": ig.seconds, "map": map_seconds, "decoder": dec_seconds,
                    "total": time.perf_counter() - t0},
    }


def decoder_psnrs(job: dict, model: torch.nn.Module, prior: GaussianPrior, T: Tensor, L: Tensor, S2: Tensor,
                  S2_map: Tensor, xr: Tensor) -> tuple[list[list[float]], float]:
    """PSNR of the learned decoder refined by MAP on every sample of every release (``[-inf]*B`` per release
    with ``--no-decoder``, or at batch > 1 with ``--no-known-rest``), and its run time.

    Each noise law gets its own decoder, trained on the auxiliary patches with their gradients noised by that
    law (isotropic; no noise for the undefended releases, which share theirs); the refinement assumes the same
    variance as the MAP attack (``S2_map``, floored when undefended).

    Batch 1: the release is the sample's gradient plus noise of variance ``S2``. Batch ``B > 1``: the decoder
    inverts one sample's gradient, so it attacks with the rest of the batch known (colluding clients, public
    samples — the attacker InvRE's per-sample prediction prices, THEORY §4.1): from ``B·release − Σ_{c≠b} g_c``
    it sees ``g_b`` plus noise of variance ``B²·S2``.
    """
    n_rel, B = len(T), xr.shape[1]
    if not job["decoder"] or (B > 1 and not job["known_rest"]):
        return [[-math.inf] * B for _ in range(n_rel)], 0.0
    t0 = time.perf_counter()
    x_aux, y_aux = job["aux"]
    R = xr.shape[0]
    own = release_gradients(model, xr.reshape(R * B, 1, *SHAPE), L[:R].reshape(R * B, 1)).reshape(R, B, -1)
    out, decoders = [], {}  # one per noise law: the undefended releases (variance 0) share theirs
    for idx in range(n_rel):
        r = idx % R
        s2 = float(S2[idx]) * B**2
        if s2 not in decoders:
            decoders[s2] = train_gradient_decoder(model, x_aux, y_aux, noise=NoiseCovariance(s2) if s2 > 0 else None,
                                                  noise_copies=2, prior=prior, seed=job["seed"])
        # each sample's own gradient plus B·ε: the release times B, less the other samples' gradients
        residual = B * T[idx].unsqueeze(0) - (own[r].sum(0, keepdim=True) - own[r])
        rec = gradient_decoder_attack(decoders[s2], residual, labels=L[idx], optimise=True,
                                      noise=NoiseCovariance(float(S2_map[idx]) * B**2),
                                      iterations=job["map_iterations"])
        out.append([matched_psnr(rec.reconstruction[b : b + 1].float(), xr[r, b : b + 1], job["cap"])[0]
                    for b in range(B)])
    return out, time.perf_counter() - t0


def attack_psnrs(row: dict) -> dict[str, float]:
    """Each attack's PSNR on one (sample, setting) pair; ``-inf`` for the decoder where it did not run
    (``--no-decoder``, batch 4 with ``--no-known-rest``, or rows saved before it joined the suite)."""
    return {"ig": row["ig"], "map": row["map"], "decoder": row.get("decoder", -math.inf)}


def strongest(row: dict) -> float:
    """The strongest attack's PSNR on one (sample, setting) pair."""
    return max(attack_psnrs(row).values())


_CACHE: dict[tuple, Tensor] = {}


def predict(group: dict, rows: list[dict], prior_kind: str, rho: float, kappa: float, cap: float) -> list[float]:
    """Predicted PSNR of each row of a group under a prior kind, ``ρ`` and ``κ`` (memoised per group and
    noise level)."""
    B = group["batch"]
    out = []
    for row in rows:
        E = row["energy"]
        key = (id(group), E, prior_kind, rho, kappa, cap)
        if key not in _CACHE:
            iso = torch.tensor([r["sigma2"] for r in group["rows"] if r["energy"] == E], dtype=torch.float64)
            per_sample = torch.zeros(len(iso), dtype=torch.float64)
            for r, v in zip([r for r in group["rows"] if r["energy"] == E], iso):
                per_sample[r["sample"]] = v
            noise = NoiseModel(isotropic=(B**2) * per_sample / kappa, rho=rho)
            if prior_kind == "data_prior":
                il = conditional_invloss(group["white"], noise)
            else:
                il = invloss(group["plain"], noise, v0=1 / 12)
            _CACHE[key] = predicted_psnr(il).clamp(max=cap)
        out.append(float(_CACHE[key][row["sample"]]))
    return out


def figures(pred: list[float], att: list[float], energies: list[float]) -> dict:
    """Coverage, Spearman (noisy / undefended), MAE (noisy) of paired predictions and attacks."""
    noisy = [i for i, e in enumerate(energies) if e > 0]
    clean = [i for i, e in enumerate(energies) if e == 0]

    def sp(idx: list[int]) -> float:
        p, a = [pred[i] for i in idx], [att[i] for i in idx]
        return spearman(p, a) if len(set(p)) > 1 and len(set(a)) > 1 else float("nan")

    return {
        "coverage": sum(a <= p + COVERAGE_MARGIN_DB for p, a in zip(pred, att)) / len(pred),
        "spearman_noisy": sp(noisy),
        "spearman_undefended": sp(clean),
        "mae_db_noisy": statistics.mean(abs(pred[i] - att[i]) for i in noisy),
        "mean_excess_db_noisy": statistics.mean(att[i] - pred[i] for i in noisy),
    }


def calibrate(groups: list[dict], cal: list[tuple[int, dict]], prior_kind: str, cap: float, target: float,
              margin: float = COVERAGE_MARGIN_DB):
    """(ρ, κ) with the least calibration MAE among those with calibration coverage ≥ ``target`` (else the best
    coverage); a calibration pair counts as covered when its attack ≤ predicted + ``margin`` dB (the held-out
    figure always uses :data:`COVERAGE_MARGIN_DB`)."""
    best = None
    for rho in RHO_GRID:
        for kappa in KAPPA_GRID:
            pred, att = [], []
            for g, row in cal:
                pred += predict(groups[g], [row], prior_kind, rho, kappa, cap)
                att.append(strongest(row))
            cov = sum(a <= p + margin for p, a in zip(pred, att)) / len(pred)
            mae = statistics.mean(abs(p - a) for p, a in zip(pred, att))
            key = (cov < target, -cov if cov < target else 0.0, mae)
            if best is None or key < best[0]:
                best = (key, rho, kappa, cov, mae)
    assert best is not None
    return best[1], best[2], best[3], best[4]


def meets(fig: dict) -> dict[str, bool]:
    """Which of the issue's four held-out targets a set of figures meets."""
    return {k: (fig[k] <= t if k == "mae_db_noisy" else fig[k] >= t) for k, t in TARGETS.items()}


def hindsight(groups: list[dict], held: list[tuple[int, dict]], family_of, families: list[str], prior_kind: str,
              cap: float) -> dict:
    """Diagnostic, never used to choose anything: the held-out figures of every per-family (ρ, κ) of the grid,
    chosen *with* the held-out answers. It separates a model that cannot fit the attacks from a calibration split
    too small to find the fit: ``n_meeting_all`` counts the grid points meeting the four targets, ``best`` is
    the one with the least noisy MAE among them (else the one meeting the most targets)."""
    att = [strongest(row) for _, row in held]
    energies = [row["energy"] for _, row in held]
    grid = [(rho, kappa) for rho in RHO_GRID for kappa in KAPPA_GRID]
    by_family = {f: [i for i, (g, _) in enumerate(held) if family_of(g) == f] for f in families}
    preds = {(f, rk): {i: predict(groups[held[i][0]], [held[i][1]], prior_kind, rk[0], rk[1], cap)[0]
                       for i in by_family[f]} for f in families for rk in grid}
    noisy = [e > 0 for e in energies]
    n, n_noisy = len(held), sum(noisy)
    # coverage and noisy MAE add up over families: screen every grid point with them, rank-correlate the rest
    parts = {(f, rk): (sum(att[i] <= p + COVERAGE_MARGIN_DB for i, p in preds[f, rk].items()),
                       sum(abs(p - att[i]) for i, p in preds[f, rk].items() if noisy[i])) for f, rk in preds}
    n_all, best = 0, None
    for choice in itertools.product(grid, repeat=len(families)):
        pick = dict(zip(families, choice))
        covered = sum(parts[f, rk][0] for f, rk in pick.items())
        abs_err = sum(parts[f, rk][1] for f, rk in pick.items())
        hopeless = covered < TARGETS["coverage"] * n - 1e-9 or abs_err > TARGETS["mae_db_noisy"] * n_noisy + 1e-9
        if hopeless and best is not None and all(best[3].values()):
            continue  # cannot meet all four, and a grid point that does is already known
        pred = [preds[family_of(g), pick[family_of(g)]][i] for i, (g, _) in enumerate(held)]
        fig = figures(pred, att, energies)
        ok = meets(fig)
        n_all += all(ok.values())
        key = (-sum(ok.values()), fig["mae_db_noisy"])
        if best is None or key < best[0]:
            best = (key, pick, fig, ok)
    assert best is not None
    return {"grid_points": len(grid) ** len(families), "n_meeting_all": n_all,
            "best": {"rho": {f: rk[0] for f, rk in best[1].items()}, "kappa": {f: rk[1] for f, rk in best[1].items()},
                     **{k: round(v, 4) for k, v in best[2].items()}, "meets": best[3]}}


def sample_sha1(x: Tensor) -> list[str]:
    """SHA-1 of each audited sample's float32 pixels: how a run proves none of its samples calibrated it."""
    return [hashlib.sha1(xi.detach().float().contiguous().numpy().tobytes()).hexdigest() for xi in x]


def read_run(path: str) -> dict:
    """A run's raw results as written by ``--save``: ``{"seed", "groups", "sample_sha1", ...}`` (a bare list of
    groups, as saved before 2026-12-02, is read as ``{"groups": ...}``)."""
    raw = torch.load(path, weights_only=False)
    return raw if isinstance(raw, dict) else {"groups": raw}


def family_name(group: dict, calibrate_per: str) -> str:
    """The calibration family of a group: its activation (``sigmoid``, ``relu``), or ``all``."""
    return group["model"].split("-")[0] if calibrate_per == "activation" else "all"


def fit_families(groups: list[dict], rows: list[tuple[int, dict]], kind: str, cap: float, target: float,
                 margin: float, calibrate_per: str) -> dict[str, tuple[float, float, float, float]]:
    """(ρ, κ, calibration coverage, calibration MAE) per family, each from that family's rows only."""
    families = sorted({family_name(groups[g], calibrate_per) for g, _ in rows})
    return {f: calibrate(groups, [(g, r) for g, r in rows if family_name(groups[g], calibrate_per) == f], kind,
                         cap, target, margin) for f in families}


def predict_fitted(groups: list[dict], rows: list[tuple[int, dict]], kind: str,
                   fitted: dict[str, tuple[float, float, float, float]], calibrate_per: str, cap: float) -> list[float]:
    """Predicted PSNR of each row under its family's fitted (ρ, κ) (``fitted`` as :func:`fit_families` returns)."""
    return [predict(groups[g], [row], kind, *fitted[family_name(groups[g], calibrate_per)][:2], cap)[0]
            for g, row in rows]


def calibrate_from_runs(paths: list[str], out: Path, *, cap: float, margin: float, calibrate_per: str) -> dict:
    """Fit the frozen calibration on every pair of other runs and write it to ``out``.

    The calibration coverage each (ρ, κ) must reach is chosen by leaving one run out
    (:func:`invdefend.fidelity.cross_validated_coverage`): the least of :data:`COVERAGE_CANDIDATES` at which a
    calibration on the other runs keeps every left-out run's coverage at the target (0.95). Pairs of one run share
    its models and prior, so a calibration that covers 95 % of its own pairs covers less of a new run's; the
    left-out runs measure how much less. Then (ρ, κ) are fitted on all the runs' pairs with that coverage.
    """
    runs = [read_run(p) for p in paths]
    for p, run in zip(paths, runs):
        if "seed" not in run or "sample_sha1" not in run:
            raise SystemExit(f"fidelity.py --calibrate-from: {p} holds no seed or sample hashes; write it again with "
                             "this version's --save")
    if len({run["seed"] for run in runs}) < len(runs):
        raise SystemExit("fidelity.py --calibrate-from: two files come from the same seed; give each run once")
    if len({run.get("quick") for run in runs}) > 1:
        raise SystemExit("fidelity.py --calibrate-from: the runs mix --quick and full mode; calibrate on one kind")
    quick = bool(runs[0].get("quick"))
    groups = [g for run in runs for g in run["groups"]]
    run_of = [ri for ri, run in enumerate(runs) for _ in run["groups"]]
    rows = [(gi, r) for gi, g in enumerate(groups) for r in g["rows"]]
    result: dict = {
        "what": "benchmarks/fidelity.py's frozen calibration: (rho, kappa) per prior and activation family, fitted on "
                "every (sample, setting) pair of the runs below; a run whose samples are among them refuses it",
        "command": "for s in " + " ".join(str(run["seed"]) for run in runs) + "; do python benchmarks/fidelity.py "
                   + ("--quick " if quick else "") + "--calibration-source split --seed $s --save run$s.pt; done; "
                   "python benchmarks/fidelity.py --calibrate-from " + " ".join(f"run{run['seed']}.pt" for run in runs),
        "runs": [{"seed": run["seed"], "n_pairs": sum(len(g["rows"]) for g in run["groups"]),
                  "sample_sha1": run["sample_sha1"]} for run in runs],
        "cap_db": cap, "coverage_margin_db": margin, "calibrate_per": calibrate_per, "quick": quick,
    }
    for kind in ("data_prior", "iid_prior"):
        def held_out(target: float, r: int, kind: str = kind) -> float:
            fitted = fit_families(groups, [(g, row) for g, row in rows if run_of[g] != r], kind, cap, target, margin,
                                  calibrate_per)
            test = [(g, row) for g, row in rows if run_of[g] == r]
            pred = predict_fitted(groups, test, kind, fitted, calibrate_per, cap)
            return figures(pred, [strongest(row) for _, row in test], [row["energy"] for _, row in test])["coverage"]

        try:
            target, table = cross_validated_coverage(held_out, len(runs), COVERAGE_CANDIDATES,
                                                     required=TARGETS["coverage"])
            validated = True
        except NoCoverageTarget as err:  # no candidate works: demand every calibration pair, and say so
            print(f"{kind}: {err}", flush=True)
            target, table, validated = 1.0, err.table, False
        fitted = fit_families(groups, rows, kind, cap, target, margin, calibrate_per)
        result[kind] = {
            "coverage_target": target,
            "left_out_runs_meet_target": validated,
            "left_out_coverage": {f"{c:g}": [round(v, 4) for v in vs] for c, vs in table.items()},
            "families": {f: {"rho": v[0], "kappa": v[1], "calibration_coverage": round(v[2], 4),
                             "calibration_mae_db": round(v[3], 3),
                             "n_pairs": sum(family_name(groups[g], calibrate_per) == f for g, _ in rows)}
                         for f, v in fitted.items()},
        }
        print(f"{kind}: calibration coverage {target:g} (left-out coverage per run: {result[kind]['left_out_coverage']})"
              f"; {json.dumps(result[kind]['families'])}", flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}", flush=True)
    return result


def read_calibration(args: argparse.Namespace) -> dict:
    """The frozen calibration of ``--calibration-file``, checked against this run's settings."""
    path: Path = args.calibration_file
    if not path.is_file():
        raise SystemExit(f"fidelity.py: no calibration file {path}; write one with --save runs and --calibrate-from, "
                         "or use --calibration-source split")
    frozen = json.loads(path.read_text())
    for key, mine in (("cap_db", args.cap_db), ("calibrate_per", args.calibrate_per),
                      ("coverage_margin_db", args.calibration_margin_db)):
        if frozen.get(key) != mine:
            raise SystemExit(f"fidelity.py: {path} was fitted with {key}={frozen.get(key)!r}, this run has {mine!r}; "
                             "use the same, or --calibration-source split")
    if frozen.get("quick") != args.quick:
        print(f"note: {path} was fitted on {'quick' if frozen.get('quick') else 'full'} runs", flush=True)
    return frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, 2000 IG iterations")
    parser.add_argument("--samples", type=int, default=None, help="audited samples per (model, batch-1) group "
                        "(batch 4 gets twice as many); default quick 4, full 8")
    parser.add_argument("--calibration-source", choices=("file", "split"), default="file",
                        help="file (default): (rho, kappa) frozen in --calibration-file, fitted on other runs, and "
                        "every pair of this run held out; split: fitted on a calibration split of this run's samples")
    parser.add_argument("--calibration-file", type=Path, default=CALIBRATION_FILE,
                        help="the frozen calibration (default: %(default)s); written by --calibrate-from")
    parser.add_argument("--calibrate-from", nargs="+", default=None, metavar="RUN",
                        help="attack nothing: fit the frozen calibration on every pair of these runs (files written "
                        "by --save, one per seed) and write it to --calibration-file")
    parser.add_argument("--calibration", type=int, default=None, help="--calibration-source split: calibration "
                        "samples per group of batch 1 (twice for batch 4); default 1 quick, 2 full")
    parser.add_argument("--ig-iterations", type=int, default=None, help="default quick 2000, full 4000")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--map-iterations", type=int, default=300, help="L-BFGS iterations of the MAP attack")
    parser.add_argument("--tv", type=float, default=1e-2, help="IG's TV weight")
    parser.add_argument("--rank", type=int, default=256, help="rank of the fitted data prior")
    parser.add_argument("--aux", type=int, default=2000, help="auxiliary patches (prior fit, training)")
    parser.add_argument("-k", type=int, default=48, help="singular values estimated per sample")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cap-db", type=float, default=60.0)
    parser.add_argument("--coverage-target", type=float, default=1.0,
                        help="--calibration-source split: calibration coverage (rho, kappa) must reach on the "
                        "calibration pairs; 1.0 = every calibration pair covered, the margin a held-out coverage of "
                        "0.95 needs with ~40 pairs per family (--calibrate-from chooses its own by leaving one run out)")
    parser.add_argument("--calibration-margin-db", type=float, default=COVERAGE_MARGIN_DB,
                        help="a calibration pair counts as covered when its attack <= predicted + this (default 1, "
                        "the held-out rule; less calibrates more conservatively)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calibrate-per", choices=("activation", "all"), default="activation",
                        help="fit (rho, kappa) per activation family (sigmoid / ReLU networks) or once for all")
    parser.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True,
                        help="batch 1: the learned gradient decoder, trained with each release's noise law and "
                             "refined by MAP, is in the suite (default; --no-decoder leaves it out)")
    parser.add_argument("--known-rest", action=argparse.BooleanOptionalAction, default=True,
                        help="batch 4: the decoder (+ MAP) also attacks each sample with the rest of its batch "
                             "known, the attacker the per-sample prediction prices (default; --no-known-rest "
                             "leaves batch 4 to IG and MAP, as before 2026-12-02)")
    parser.add_argument("--decoder-aux", type=int, default=1000, help="the decoder's auxiliary patches")
    parser.add_argument("--seed", type=int, default=6, help="default 6; seeds whose samples calibrated "
                        "--calibration-file (0, 4, 5 for the shipped one) are refused with it")
    parser.add_argument("--save", default=None, help="write the attacks' raw results (per group), the seed and the "
                        "samples' hashes to this file (a calibration run for --calibrate-from)")
    parser.add_argument("--load", default=None, help="skip the attacks: read raw results written by --save (the "
                        "calibration and figures are recomputed)")
    parser.add_argument("--hindsight", action="store_true", help="diagnostic: also report the best held-out "
                        "figures any per-family (rho, kappa) of the grid reaches, chosen with the held-out answers "
                        "(about a minute; never used for the calibrated figures)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.calibrate_from:
        calibrate_from_runs(args.calibrate_from, args.calibration_file, cap=args.cap_db,
                            margin=args.calibration_margin_db, calibrate_per=args.calibrate_per)
        return
    frozen = read_calibration(args) if args.calibration_source == "file" else None
    n1 = args.samples or (4 if args.quick else 8)
    c1 = args.calibration or (1 if args.quick else 2)
    ig_iters = args.ig_iterations or (2000 if args.quick else 4000)

    x_aux, y_aux = photo_patches(args.aux, seed=args.seed, part="left")
    prior = GaussianPrior.fit(x_aux, args.rank)
    print(f"prior: rank {prior.rank} from {len(x_aux)} auxiliary patches (left halves), top-{prior.rank} directions "
          f"hold {prior.explained_fraction(prior.rank):.1%} of the variance", flush=True)
    n_audit = sum(n1 * B for B in BATCHES) * len(MODELS)
    x_all, y_all = photo_patches(n_audit, seed=args.seed + 1, part="right")
    hashes = sample_sha1(x_all)
    if frozen is not None:
        used = {h for run in frozen["runs"] for h in run["sample_sha1"]}
        if used & set(hashes):
            raise SystemExit(f"fidelity.py: {len(used & set(hashes))} of this run's samples calibrated "
                             f"{args.calibration_file} (its runs: seeds {[r['seed'] for r in frozen['runs']]}); pick "
                             "another --seed, or --calibration-source split")
    jobs = []
    offset = 0
    for mi, spec in enumerate(MODELS):
        model = build_model(spec, x_aux, y_aux, epochs=args.epochs, seed=args.seed + mi)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for B in BATCHES:
            n = n1 * B
            jobs.append({
                "spec": spec, "state": state, "prior": prior.state_dict(), "x": x_all[offset : offset + n],
                "y": y_all[offset : offset + n], "batch": B, "seed": args.seed + 100 * mi + B, "k": args.k,
                "tv": args.tv, "ig_iterations": ig_iters, "restarts": args.restarts,
                "map_iterations": args.map_iterations, "cap": args.cap_db, "decoder": args.decoder,
                "known_rest": args.known_rest,
                "aux": (x_aux[: args.decoder_aux], y_aux[: args.decoder_aux])
                if args.decoder and (B == 1 or args.known_rest) else None,
            })
            offset += n
    print(f"{len(jobs)} groups, {n_audit} audited samples (right halves), {len(ENERGIES) * len(BATCHES) * len(MODELS)} "
          f"settings; {args.workers} workers", flush=True)
    if args.load:
        groups = read_run(args.load)["groups"]
        print(f"raw results read from {args.load}", flush=True)
    elif args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            groups = pool.map(run_group, jobs, chunksize=1)
    else:
        groups = [run_group(j) for j in jobs]
    if args.save:
        torch.save({"seed": args.seed, "groups": groups, "sample_sha1": hashes, "quick": args.quick}, args.save)
    for g in groups:
        s = g["seconds"]
        print(f"  {g['model']:<16} B={g['batch']}: spectra {s['spectra']:.0f} s, IG {s['ig']:.0f} s, MAP {s['map']:.0f} s, "
              f"decoder {s.get('decoder', 0.0):.0f} s", flush=True)

    families = sorted({family_name(g, args.calibrate_per) for g in groups})

    def family_of(gi: int) -> str:
        return family_name(groups[gi], args.calibrate_per)

    if frozen is not None:  # every pair of this run is held out; (ρ, κ) come from other runs
        cal_rows: list[tuple[int, dict]] = []
        held_rows = [(gi, r) for gi, g in enumerate(groups) for r in g["rows"]]
    else:  # calibration split by sample: a sample is calibration or held out in all its settings
        sizes = [g["rows"][-1]["sample"] + 1 for g in groups]
        per_group = [c1 * g["batch"] for g in groups]
        cal_ids: set[tuple[int, int]] = set()
        held_ids: set[tuple[int, int]] = set()
        for gi, (size, pg) in enumerate(zip(sizes, per_group)):
            cal, held = calibration_split([size], pg, seed=args.seed + gi)
            cal_ids |= {(gi, i) for _, i in cal}
            held_ids |= {(gi, i) for _, i in held}
        assert not cal_ids & held_ids
        cal_rows = [(gi, r) for gi, g in enumerate(groups) for r in g["rows"] if (gi, r["sample"]) in cal_ids]
        held_rows = [(gi, r) for gi, g in enumerate(groups) for r in g["rows"] if (gi, r["sample"]) in held_ids]

    result: dict = {}
    for kind in ("data_prior", "iid_prior"):
        fitted: dict[str, tuple[float, float, float, float]] = {}
        if frozen is not None:
            missing = [f for f in families if f not in frozen[kind]["families"]]
            if missing:
                raise SystemExit(f"fidelity.py: {args.calibration_file} has no {kind} calibration for {missing}")
            fam_cal = {f: frozen[kind]["families"][f] for f in families}
            fitted = {f: (c["rho"], c["kappa"], c["calibration_coverage"], c["calibration_mae_db"])
                      for f, c in fam_cal.items()}
            n_cal = {f: c["n_pairs"] for f, c in fam_cal.items()}
        else:  # (ρ, κ) per activation family, from that family's calibration pairs only
            fitted = fit_families(groups, cal_rows, kind, args.cap_db, args.coverage_target,
                                  args.calibration_margin_db, args.calibrate_per)
            n_cal = {fam: sum(family_of(g) == fam for g, _ in cal_rows) for fam in families}
        pred = predict_fitted(groups, held_rows, kind, fitted, args.calibrate_per, args.cap_db)
        att = [strongest(row) for _, row in held_rows]
        energies = [row["energy"] for _, row in held_rows]
        fig = figures(pred, att, energies)
        for fam, (rho, kappa, cal_cov, cal_mae) in fitted.items():
            where = f"other runs' {n_cal[fam]} pairs ({args.calibration_file.name})" if frozen else f"{n_cal[fam]} pairs"
            print(f"{kind} [{fam}]: calibrated on {where}: rho {rho:.3g}, kappa {kappa:g} (calibration coverage "
                  f"{cal_cov:.2f}, MAE {cal_mae:.2f} dB); frozen", flush=True)
        print(f"{'setting':<28}{'pred':>7}{'IG':>7}{'MAP':>7}{'DEC':>7}{'best':>7}{'covered':>9}")
        for gi, g in enumerate(groups):
            for E in ENERGIES:
                idx = [i for i, (gg, row) in enumerate(held_rows) if gg == gi and row["energy"] == E]
                rows = [held_rows[i][1] for i in idx]
                label = f"{g['model']} B={g['batch']} E={E:g}"
                print(f"{label:<28}{statistics.mean(pred[i] for i in idx):>7.1f}"
                      f"{statistics.mean(r['ig'] for r in rows):>7.1f}{statistics.mean(r['map'] for r in rows):>7.1f}"
                      f"{statistics.mean(attack_psnrs(r)['decoder'] for r in rows):>7.1f}"
                      f"{statistics.mean(att[i] for i in idx):>7.1f}"
                      f"{sum(att[i] <= pred[i] + COVERAGE_MARGIN_DB for i in idx):>6d}/{len(idx)}")
        result[kind] = {
            **{k: round(v, 4) for k, v in fig.items()},
            "rho": {fam: f[0] for fam, f in fitted.items()},
            "kappa": {fam: f[1] for fam, f in fitted.items()},
            "calibration_coverage": {fam: round(f[2], 4) for fam, f in fitted.items()},
            "calibration_mae_db": {fam: round(f[3], 3) for fam, f in fitted.items()},
            # the best one can hope for: P(held-out coverage ≥ 0.95) for independent pairs, per family
            "calibration_confidence": {fam: round(coverage_confidence(n_cal[fam], round((1 - f[2]) * n_cal[fam])), 3)
                                       for fam, f in fitted.items() if f[2] > 0},
            "meets": meets(fig),
        }
        if args.hindsight and kind == "data_prior":
            result[kind]["hindsight"] = hindsight(groups, held_rows, family_of, families, kind, args.cap_db)
            print(f"{kind}: hindsight (diagnostic): {json.dumps(result[kind]['hindsight'])}", flush=True)
    wins = {"ig": 0, "map": 0, "decoder": 0}
    for _, row in held_rows:
        scores = attack_psnrs(row)
        wins[max(scores, key=scores.__getitem__)] += 1
    out = {
        **{k: result["data_prior"][k] for k in ("coverage", "spearman_noisy", "spearman_undefended", "mae_db_noisy")},
        "n_pairs": len(held_rows),
        "n_calibration_pairs": sum(r["n_pairs"] for r in frozen["runs"]) if frozen else len(cal_rows),
        "calibration_source": args.calibration_source,
        **({"calibration_runs": [r["seed"] for r in frozen["runs"]],
            "calibration_coverage_target": {k: frozen[k]["coverage_target"] for k in ("data_prior", "iid_prior")}}
           if frozen else {}),
        "n_settings": len(ENERGIES) * len(BATCHES) * len(MODELS),
        "data_prior": result["data_prior"],
        "iid_prior": result["iid_prior"],
        "strongest_attack_counts": wins,
        "ig_iterations": ig_iters, "ig_restarts": args.restarts, "map_iterations": args.map_iterations,
        "decoder": args.decoder, "decoder_aux": args.decoder_aux if args.decoder else None,
        "prior_rank": prior.rank, "quick": args.quick, "calibrate_per": args.calibrate_per,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
