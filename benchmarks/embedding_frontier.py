"""Split-learning embeddings: prior-aware noise placement against isotropic noise at EQUAL TOP-MODEL ACCURACY.

    python benchmarks/embedding_frontier.py --quick      # 14.2 min on 2 idle cores (26–30 min under load)
    python benchmarks/embedding_frontier.py              # the full sweep (more data, seeds, samples, F=0.25 too)
    python benchmarks/embedding_frontier.py --quick --floors --waterfill   # isotropic against ``waterfill`` only

Setting. 32×32×3 patches of the nine photographs that ship with scikit-learn / scikit-image
(:func:`invdefend.data.photo_patches`, label = photo index, 9 classes). Training data and the attacker's
auxiliary data come from the LEFT half of every photo (different seeds), test data and the audited samples
from the RIGHT half (no pixel in common with either). The split model is a small ReLU conv bottom (the client)
``conv5x5(3→12, s2) → ReLU → conv5x5(12→12, s2) → ReLU → conv5x5(12→c, s2) → ReLU → flatten`` whose output
``h(x)`` (``m = 16·c``, 64 at ``--channels 4``) is what is released, and an MLP top (the server,
``m → 64 → 9``), trained jointly (Adam, batch 32) with :class:`invdefend.EmbeddingDefense` attached to the
bottom as its forward hook, so the top model trains on the noisy embeddings and the bottom receives gradients
through them. Each sample's noise has relative energy ``E`` (``‖noise‖² ≈ E·‖h(x)‖²``):

* ``isotropic``: ``mechanism="isotropic"``, ``budget=E``;
* ``prior_floorF``: the prior-aware placement, ``mechanism="spectral"`` with ``prior=`` the
  :class:`~invdefend.prior.GaussianPrior` fitted by the defender on its training patches (water-filling on the
  spectrum of the prior-whitened Jacobian ``J·A``, weighted by pixel variance, THEORY §8.5) at ``budget=(1−F)·E``
  plus an isotropic ``floor=F·E``: the same total energy ``E``. ``F`` = 0.5 (and 0.25 in the full run);
* ``waterfill`` (with ``--waterfill``): ``mechanism="spectral"``, ``budget=E``, no prior, no floor: the
  embedding defense's default until 2026-12-02 (water-filling over each sample's spectrum, priced under the
  i.i.d. prior). Its JSON key is ``"waterfill"`` where a floor share would stand; the headline figures are
  those of the first compared placement.

Both defenses also price their records under the same prior. The embedding is small (``m ≤ 256``), so the
defense takes the exact, complete spectrum of every sample.

Accuracy. For every placement, energy and seed (paired: same initialisation, batch order and test set across
placements), the top-model test accuracy on ``--test`` right-half patches. Test-time embeddings DO get noise:
``active_in_eval=True`` (the library's default) — the client's inference also sends embeddings, and the audited
samples below are exactly such eval-mode releases, so the accuracy that pays for a release's privacy is the
accuracy measured on noisy embeddings. The clean-embedding accuracy (defense detached) is reported too.

Attacks (threat model: the server / anyone on the link knows the bottom model's weights and architecture,
the defense's configuration and its per-release noise law — Kerckhoffs — and holds auxiliary patches from the
client's distribution, never the audited ones). The audited samples are ``--audit`` right-half patches, each
released once (eval mode, through the attached defense, one batch). Every release is attacked by

* ``decoder``: the learned decoder (:func:`invdefend.attacks.train_embedding_decoder` + ``decoder_attack``),
  trained by the attacker on its auxiliary patches' embeddings with noise drawn, fresh at every mini-batch,
  from the defense's own law for each auxiliary patch (defense-aware): the attacker runs the defense's own
  estimator and planner (``EmbeddingDefense.estimate`` / ``plan_for``, the code path of a release) on its
  auxiliary patches, so every auxiliary patch gets exactly the per-sample law (its own basis and variances)
  the defense would have used;
* ``aware``: the defense-aware MAP attack with the prior
  (:func:`invdefend.attacks.defense_aware_embedding_attack`, ``prior=`` a GaussianPrior the attacker fitted on
  its auxiliary patches, ``noise=`` the release's exact law from ``EmbeddingDefense.noise_law()``, float64
  L-BFGS in whitened coordinates), once from the prior mean and once started at the decoder's output
  (``--aware-init``), and, on releases whose law is not isotropic, once more from the prior mean with the
  isotropic law of the same total energy (``E·‖h̃‖²/((1+E)·m)`` per coordinate: an attacker that does not
  trust the published law — it is stronger on some samples); its PSNR per sample is the best of these.

Per sample the strongest attack counts (highest PSNR, an oracle choice that upper-bounds any real attacker's
choice). Attacked bottoms (``--bottoms``): ``trained`` — the bottom of the first seed's training run at that
placement and energy (the model that releases the test-time embeddings at that accuracy), and ``initial`` —
the shared initial bottom (the model that releases the first training batches; the same for every placement,
so equal-energy comparisons on it are exactly paired). With both, each sample's strongest PSNR is the maximum
over both bottoms too (the attacker's best case).

Equal accuracy. Accuracies are paired means over seeds. The recommended isotropic energy ``E_iso`` is the
largest sweep energy whose isotropic accuracy drop (undefended − isotropic, paired mean) is at most
``--max-drop`` (1) point; if none is, the smallest sweep energy (flagged). The prior placement's
equal-accuracy energy ``E_prior`` is where its accuracy curve first falls to the isotropic accuracy at
``E_iso``, interpolated linearly in ``log E`` between sweep energies (the conservative crossing: the least
noise that costs the same accuracy); ``None`` when it lies outside the sweep. The gap compares isotropic's
mean strongest-attack PSNR at ``E_iso`` (measured) with the prior placement's at ``E_prior`` (its mean PSNR
curve interpolated linearly in ``log E``). The same construction is reported for every isotropic sweep
energy (the whole frontier), because with a few seeds a one-point accuracy criterion is within seed noise.

Output: progress lines, a table, then ONE JSON line with these keys:

* ``embedding_psnr_gap_db_equal_accuracy``: the headline gap (dB, isotropic − prior placement) at equal
  accuracy, for the first floor share, strongest attack per sample; positive = the prior placement leaks less.
  ``..._decoder`` / ``..._aware``: the same gap with one attack only (at the same energies).
  ``..._by_floor``: ``{F: gap}`` for every floor share.
* ``target_gap_db`` (3.0) and ``target_met`` (headline gap ≥ target and not an upper bound).
* ``recommended_energy``: ``E_iso``; ``recommended_energy_fallback``: True when no sweep energy kept the drop
  within ``max_drop_pts``; ``iso_accuracy_at_recommended_pct``.
* ``equal_accuracy_energy``: ``{F: E_prior}``.
* ``embedding_psnr_gap_db_equal_accuracy_bound``: ``None`` when the equal-accuracy energy lies inside the
  sweep; ``"upper"`` when the prior placement's accuracy is already below the isotropic one at the smallest
  sweep energy (the gap is then computed there and is an upper bound), ``"lower"`` when it never falls to it
  (computed at the largest energy: a lower bound).
* ``equal_accuracy_frontier``: ``{F: {E_iso: {"iso_accuracy_pct", "prior_energy", "gap_bound", "iso_psnr",
  "prior_psnr", "gap_db", and the same three per attack with suffix _decoder / _aware}}}`` for every
  isotropic sweep energy.
* ``psnr_gap_db_equal_energy``: ``{F: {E: {"strongest", "decoder", "aware"}}}`` — isotropic − prior placement
  at the same energy (dB).
* ``psnr_db``: ``{placement: {E: {"strongest", "decoder", "aware", "aware_from_prior_mean",
  "aware_from_decoder", "aware_iso_law", "predicted", "by_bottom": {bottom: strongest}}}}`` — mean PSNR (dB)
  over the audited samples; ``predicted`` is the defense's own predicted PSNR of the audited releases (its risk
  record, under the defender's prior). No attack is run on an undefended release (there is no noise law to whiten by);
  the smallest sweep energy is the near-undefended reference.
* ``accuracy_pct``: ``{placement: {E: mean test accuracy on noisy embeddings}}`` (``undefended`` under ``"0"``);
  ``accuracy_clean_pct``: the same with the defense detached at test time; ``accuracy_seeds_pct``: per seed;
  ``accuracy_drop_pts``: ``{placement: {E: [paired mean drop, its standard error]}}``.
* ``relative_energy``: ``{placement: {E: mean measured ‖noise‖²/‖h‖² during training}}``; ``fallbacks``: total
  fail-closed fallback batches over all runs.
* ``prior_mean_psnr_db``: PSNR of the attacker's prior mean (knows nothing about the sample).
* ``settings``: the run's parameters (``m``, samples, seeds, energies, floors, iterations, bottoms, ...).
* ``seconds``: wall time; ``quick``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from invdefend.attacks import (
    decoder_attack,
    defense_aware_embedding_attack,
    train_embedding_decoder,
)
from invdefend.data import PHOTOS, photo_patches
from invdefend.defense import EmbeddingDefense
from invdefend.metrics import psnr
from invdefend.models import MLP, SplitModel
from invdefend.noise_law import NoiseCovariance
from invdefend.prior import GaussianPrior

SHAPE = (3, 32, 32)
CLASSES = len(PHOTOS)
TARGET_GAP_DB = 3.0
#: The variants of the aware MAP attack; their per-sample maximum is the ``aware`` attack.
AWARE = ("aware_from_prior_mean", "aware_from_decoder", "aware_iso_law")

_STATE: dict[str, Any] = {}  # per-process data: patches and priors (set by _init)


# -- the split model --------------------------------------------------------------------------------------
def make_model(channels: int, seed: int) -> SplitModel:
    """The split model at its seeded initialisation (PyTorch defaults): conv bottom → ``m = 16·channels``."""
    torch.manual_seed(seed)
    bottom = nn.Sequential(
        nn.Conv2d(3, 12, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(12, channels, 5, stride=2, padding=2), nn.ReLU(),
        nn.Flatten(),
    )
    top = MLP(16 * channels, hidden=(64,), out_features=CLASSES)
    return SplitModel(bottom, top)


def settings_for(placement: str, energy: float, prior: GaussianPrior) -> dict[str, Any]:
    """EmbeddingDefense keywords of a placement at total relative energy ``energy``."""
    if placement == "isotropic":
        return {"mechanism": "isotropic", "budget": energy, "prior": prior}
    if placement.startswith("prior_floor"):
        share = float(placement[len("prior_floor"):])
        return {"mechanism": "spectral", "budget": (1 - share) * energy, "floor": share * energy, "prior": prior}
    if placement == "waterfill":  # the embedding default until 2026-12-02: water-filling, no prior, no floor
        return {"mechanism": "spectral", "budget": energy, "prior": None}
    raise ValueError(placement)


def label(placement: str) -> str:
    """A compared placement's key in the JSON: its floor share (``"0.5"``) or ``"waterfill"``."""
    return placement.removeprefix("prior_floor")


# -- per-process state --------------------------------------------------------------------------------------
def load_state(args: dict[str, Any]) -> dict[str, Any]:
    """Patches and priors, built identically in every process from the seeds."""
    s = args["seed"]
    x_tr, y_tr = photo_patches(args["train"], seed=s, part="left")
    x_aux, _ = photo_patches(args["aux"], seed=s + 1, part="left")
    x_te, y_te = photo_patches(max(args["test"], args["audit"]), seed=s + 11, part="right")
    return {
        "x_train": x_tr, "y_train": y_tr, "x_aux": x_aux,
        "x_test": x_te[: args["test"]], "y_test": y_te[: args["test"]],
        "x_audit": x_te[: args["audit"]],
        "prior_defender": GaussianPrior.fit(x_tr, args["rank"]),  # the defender's prior: its own training patches
        "prior_attacker": GaussianPrior.fit(x_aux, args["rank"]),  # the attacker's: its auxiliary patches
    }


def _init(args: dict[str, Any], shared: dict[str, Any] | None) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # fallbacks are counted from the records
    if shared is None:
        shared = load_state(args)
    _STATE.clear()
    _STATE.update(shared)
    _STATE["args"] = args


# -- accuracy -------------------------------------------------------------------------------------------------
def train_job(placement: str, energy: float, seed: int, keep_bottom: bool) -> dict[str, Any]:
    """Train one split model with the placement attached (``"undefended"``: none); test accuracy on noisy and
    on clean embeddings, the measured relative energy, fallbacks, and (``keep_bottom``) the trained bottom."""
    a, st = _STATE["args"], _STATE
    t0 = time.perf_counter()
    model = make_model(a["channels"], seed)
    defense = None
    if placement != "undefended":
        defense = EmbeddingDefense(model.bottom, seed=seed, **settings_for(placement, energy, st["prior_defender"]))
        defense.attach()  # active_in_eval=True (default): test-time embeddings get noise too
    opt = torch.optim.Adam(model.parameters(), lr=a["lr"])
    order = torch.Generator().manual_seed(seed)
    x, y = st["x_train"], st["y_train"]
    energies: list[float] = []
    fallbacks = 0
    for _ in range(a["epochs"]):
        model.train()
        for idx in torch.randperm(len(x), generator=order).split(a["batch"]):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if defense is not None:
                energies.append(defense.last_record.relative_energy)
                fallbacks += int(defense.last_record.fallback)
    model.eval()
    with torch.no_grad():
        hits = 0
        for idx in torch.arange(len(st["x_test"])).split(128):
            hits += int((model(st["x_test"][idx]).argmax(1) == st["y_test"][idx]).sum())
            if defense is not None:
                fallbacks += int(defense.last_record.fallback)
        acc = hits / len(st["x_test"])
        if defense is not None:
            defense.detach()
        clean = float((model(st["x_test"]).argmax(1) == st["y_test"]).float().mean())
    out = {"kind": "train", "placement": placement, "energy": energy, "seed": seed, "acc": acc, "acc_clean": clean,
           "relative_energy": statistics.mean(energies) if energies else 0.0, "fallbacks": fallbacks,
           "seconds": time.perf_counter() - t0}
    if keep_bottom:
        out["bottom"] = {k: v.clone() for k, v in model.bottom.state_dict().items()}
    return out


# -- attacks --------------------------------------------------------------------------------------------------
class AuxNoise:
    """``noise_sampler`` for :func:`train_embedding_decoder`: a fresh draw, for every auxiliary patch in the
    mini-batch, from that patch's own law ``N(0, iso·I + U diag(τ) Uᵀ)``. The sampler is handed the inputs, not
    their indices, so each patch is recognised by a fixed random projection of its pixels."""

    def __init__(self, x_aux: torch.Tensor, iso: torch.Tensor, basis: torch.Tensor | None, tau: torch.Tensor | None,
                 seed: int) -> None:
        self.w = torch.randn(x_aux[0].numel(), generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
        keys = x_aux.reshape(len(x_aux), -1).double() @ self.w
        self.sorted, self.order = keys.sort()
        self.iso, self.basis, self.tau = iso.double(), basis, tau
        self.gen = torch.Generator().manual_seed(seed)

    def index(self, inputs: torch.Tensor) -> torch.Tensor:
        keys = inputs.reshape(len(inputs), -1).double() @ self.w
        pos = torch.searchsorted(self.sorted, keys).clamp(max=len(self.sorted) - 1)
        lo = (pos - 1).clamp(min=0)
        pos = torch.where((self.sorted[lo] - keys).abs() < (self.sorted[pos] - keys).abs(), lo, pos)
        if not bool(((self.sorted[pos] - keys).abs() <= 1e-6 * keys.abs().clamp_min(1.0)).all()):
            raise RuntimeError("AuxNoise: an input is not one of the auxiliary patches")
        return self.order[pos]

    def __call__(self, inputs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        idx = self.index(inputs)
        B, m = embeddings.shape
        noise = self.iso[idx].sqrt().unsqueeze(1) * torch.randn(B, m, generator=self.gen, dtype=torch.float64)
        if self.basis is not None:
            U, tau = self.basis[idx].double(), self.tau[idx].double()
            w = torch.randn(B, tau.shape[1], generator=self.gen, dtype=torch.float64) * tau.clamp_min(0).sqrt()
            noise = noise + (U @ w.unsqueeze(-1)).squeeze(-1)
        return noise.to(embeddings.dtype)


def aux_laws(bottom: nn.Module, placement: str, energies: list[float], chunk: int = 64) -> dict[float, tuple]:
    """Every auxiliary patch's noise law under the placement at each energy, by the defense's own estimator and
    planner: ``{E: (iso (N,), basis (N, m, k) or None, tau (N, k) or None)}``."""
    st = _STATE
    x_aux = st["x_aux"]
    with torch.no_grad():
        h = bottom(x_aux).reshape(len(x_aux), -1)
    energy = h.double().pow(2).sum(dim=1).to(h.dtype)  # as EmbeddingDefense.protect computes it
    m = h.shape[1]
    if placement == "isotropic":  # the isotropic placement's law: budget·‖h‖²/m per coordinate, no spectrum
        return {E: (E * energy.double() / m, None, None) for E in energies}
    probe = EmbeddingDefense(bottom, **settings_for(placement, energies[0], st["prior_defender"]))
    specs = [probe.estimate(x_aux[i : i + chunk]) for i in range(0, len(x_aux), chunk)]
    out = {}
    for E in energies:
        planner = EmbeddingDefense(bottom, **settings_for(placement, E, st["prior_defender"]))
        iso, basis, tau = [], [], []
        for j, spec in enumerate(specs):
            plan = planner.plan_for(spec, energy[j * chunk : (j + 1) * chunk])
            iso.append(plan.isotropic.double())
            basis.append(spec.left_vectors.float())
            tau.append(plan.shaped.double() if plan.shaped is not None else torch.zeros(spec.left_vectors.shape[0],
                                                                                       spec.left_vectors.shape[2]))
        out[E] = (torch.cat(iso), torch.cat(basis), torch.cat(tau))
    return out


def _check_laws(bottom: nn.Module, placement: str, energy: float, laws: tuple) -> None:
    """The planner path reproduces the defense's own recorded law on the first auxiliary patches."""
    st = _STATE
    x = st["x_aux"][:4]
    d = EmbeddingDefense(bottom, seed=0, **settings_for(placement, energy, st["prior_defender"])).attach()
    with torch.no_grad():
        bottom(x)
    d.detach()
    for b, law in enumerate(d.noise_law()):
        iso = laws[0][b]
        assert abs(float(law.sigma2_iso) - float(iso)) <= 1e-4 * float(iso), (law.sigma2_iso, float(iso))
        if laws[1] is not None and law.tau is not None:
            assert torch.allclose(law.tau.double(), laws[2][b].double(), rtol=1e-3, atol=1e-6 * float(law.tau.max()))


def attack_job(bottom_kind: str, placement: str, energies: list[float], state: dict | None,
               seed: int) -> dict[str, Any]:
    """Release the audited samples through the bottom (``state``: trained weights; None: the initial bottom of
    ``seed``) with the placement at each energy and attack every release; per-sample PSNRs."""
    a, st = _STATE["args"], _STATE
    t0 = time.perf_counter()
    model = make_model(a["channels"], seed)
    bottom = model.bottom
    if state is not None:
        bottom.load_state_dict(state)
    bottom.eval()
    for p in bottom.parameters():
        p.requires_grad_(False)
    x = st["x_audit"]
    n = len(x)
    prior = st["prior_attacker"]
    laws_by_e = aux_laws(bottom, placement, energies)
    _check_laws(bottom, placement, energies[0], laws_by_e[energies[0]])
    out: dict[str, Any] = {"kind": "attack", "bottom": bottom_kind, "placement": placement, "results": {}}
    for E in energies:
        defense = EmbeddingDefense(bottom, seed=10_000 + seed, **settings_for(placement, E, st["prior_defender"]))
        defense.attach()
        with torch.no_grad():
            released = bottom(x).reshape(n, -1).detach()
        defense.detach()
        laws = defense.noise_law()
        fallback = bool(defense.last_record.fallback)
        predicted = list(defense.last_record.predicted_psnr)
        iso, basis, tau = laws_by_e[E]
        sampler = AuxNoise(st["x_aux"], iso, basis, tau, seed=seed + 7)
        decoder = train_embedding_decoder(bottom, st["x_aux"], hidden=tuple(a["decoder_hidden"]),
                                          epochs=a["decoder_epochs"], noise_sampler=sampler, seed=seed)
        dec = decoder_attack(decoder, released).reconstruction.reshape(n, *SHAPE).clamp(0, 1)
        p_dec = psnr(dec, x).tolist()
        p_mean, p_from_dec, p_iso_law = [], [], []
        m = released.shape[1]
        for i in range(n):
            h_i = released[i : i + 1]
            # an attacker that does not trust the published law: the isotropic law of the same total energy
            iso_law = NoiseCovariance(sigma2_iso=E * float(h_i.double().pow(2).sum()) / ((1 + E) * m))
            for init, law, dest in (("prior_mean", laws[i], p_mean), ("decoder", laws[i], p_from_dec),
                                    ("prior_mean", iso_law, p_iso_law)):
                if init not in a["aware_init"] or (dest is p_iso_law and laws[i].basis is None):
                    continue
                start = None if init == "prior_mean" else dec[i : i + 1].double().clamp(1e-3, 1 - 1e-3)
                rec = defense_aware_embedding_attack(bottom, h_i, noise=law, input_shape=(1, *SHAPE), prior=prior,
                                                     iterations=a["map_iterations"], init=start)
                dest.append(float(psnr(rec.reconstruction.reshape(SHAPE).float().clamp(0, 1), x[i])))
        out["results"][E] = {"decoder": p_dec, "aware_from_prior_mean": p_mean, "aware_from_decoder": p_from_dec,
                             "aware_iso_law": p_iso_law, "predicted": predicted, "fallback": fallback}
    out["seconds"] = time.perf_counter() - t0
    return out


# -- figures ---------------------------------------------------------------------------------------------------
def loglin(points: list[tuple[float, float]], e: float) -> float:
    """``y`` at ``e`` on the piecewise-linear-in-``log E`` curve through ``points`` (sorted by energy)."""
    for (e0, y0), (e1, y1) in itertools.pairwise(points):
        if e0 <= e <= e1:
            f = 0.0 if e1 == e0 else (math.log(e) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return y0 + f * (y1 - y0)
    raise ValueError(f"{e} outside the sweep")


def first_crossing(points: list[tuple[float, float]], target: float) -> tuple[float, str | None]:
    """The smallest energy at which the accuracy curve (sorted by energy) falls to ``target``, linear in log E,
    and ``None``; or, outside the sweep, ``(smallest energy, "upper")`` when the curve is already below
    ``target`` there (the equal-accuracy energy is smaller, so the PSNR gap computed there is an upper bound),
    ``(largest energy, "lower")`` when it never falls to ``target`` (a lower bound on the gap)."""
    if points[0][1] <= target:
        return points[0][0], (None if points[0][1] == target else "upper")
    for (e0, y0), (e1, y1) in itertools.pairwise(points):
        if y0 > target >= y1:
            f = (y0 - target) / (y0 - y1)
            return math.exp(math.log(e0) + f * (math.log(e1) - math.log(e0))), None
    return points[-1][0], "lower"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--channels", type=int, default=4, help="bottom output channels c; m = 16·c")
    parser.add_argument("--train", type=int, default=None, help="training patches (quick 800, full 2000)")
    parser.add_argument("--test", type=int, default=None, help="test patches (quick 600, full 1000)")
    parser.add_argument("--epochs", type=int, default=None, help="quick 3, full 4")
    parser.add_argument("--seeds", type=int, default=None, help="paired training seeds (quick 2, full 3)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--energies", type=float, nargs="+", default=None,
                        help="relative noise energies (quick 0.01 0.1 0.3 1; full 0.01 0.03 0.1 0.3 1 3)")
    parser.add_argument("--waterfill", action="store_true",
                        help="also compare water-filling without a prior or a floor (the embedding default until "
                             "2026-12-02) with isotropic noise")
    parser.add_argument("--floors", type=float, nargs="*", default=None,
                        help="isotropic shares F (quick 0.5; full 0.5 0.25)")
    parser.add_argument("--audit", type=int, default=None, help="audited samples (quick 8, full 16)")
    parser.add_argument("--aux", type=int, default=None, help="attacker's auxiliary patches (quick 1000, full 2000)")
    parser.add_argument("--rank", type=int, default=256, help="rank of both Gaussian priors")
    parser.add_argument("--map-iterations", type=int, default=300)
    parser.add_argument("--aware-init", nargs="+", default=["prior_mean", "decoder"], choices=["prior_mean", "decoder"])
    parser.add_argument("--decoder-epochs", type=int, default=None, help="quick 60, full 100")
    parser.add_argument("--decoder-hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--bottoms", nargs="+", default=None, choices=["trained", "initial"],
                        help="attacked bottoms (quick: trained; full: trained initial)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points isotropic noise may cost")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    q = ns.quick
    pick = lambda v, quick, full: v if v is not None else (quick if q else full)
    args = {
        "channels": ns.channels, "train": pick(ns.train, 800, 2000), "test": pick(ns.test, 600, 1000),
        "epochs": pick(ns.epochs, 3, 4), "seeds": pick(ns.seeds, 2, 3), "batch": ns.batch, "lr": ns.lr,
        "energies": sorted(pick(ns.energies, [0.01, 0.1, 0.3, 1.0], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])),
        "floors": pick(ns.floors, [0.5], [0.5, 0.25]), "audit": pick(ns.audit, 8, 16),
        "aux": pick(ns.aux, 1000, 2000), "rank": ns.rank, "map_iterations": ns.map_iterations,
        "aware_init": list(ns.aware_init), "decoder_epochs": pick(ns.decoder_epochs, 60, 100),
        "decoder_hidden": list(ns.decoder_hidden), "bottoms": pick(ns.bottoms, ["trained"], ["trained", "initial"]),
        "max_drop": ns.max_drop, "seed": ns.seed, "workers": ns.workers, "waterfill": ns.waterfill,
    }
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    shared = load_state(args)
    _init(args, shared)
    energies = args["energies"]
    placements = ["isotropic"] + [f"prior_floor{f:g}" for f in args["floors"]] + (["waterfill"] if ns.waterfill else [])
    if len(placements) < 2:
        parser.error("nothing to compare with isotropic noise: give --floors F ... and/or --waterfill")
    seeds = [args["seed"] + i for i in range(args["seeds"])]

    train_jobs = [(p, E, s, s == seeds[0] and "trained" in args["bottoms"])
                  for E in sorted(energies, reverse=True) for p in placements for s in seeds]
    train_jobs += [("undefended", 0.0, s, False) for s in seeds]
    attack_jobs = []
    if "initial" in args["bottoms"]:
        attack_jobs += [("initial", p, energies, None, seeds[0]) for p in placements]

    results: list[dict[str, Any]] = []
    if args["workers"] <= 1:
        for job in train_jobs:
            r = train_job(*job)
            results.append(r)
            _progress(r, t0)
            if r["kind"] == "train" and "bottom" in r:
                attack_jobs.append(("trained", r["placement"], [r["energy"]], r.pop("bottom"), r["seed"]))
        for job in attack_jobs:
            r = attack_job(*job)
            results.append(r)
            _progress(r, t0)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args["workers"], initializer=_init, initargs=(args, shared)) as pool:
            pending = [pool.apply_async(attack_job, job) for job in attack_jobs]  # long jobs first
            pending += [pool.apply_async(train_job, job) for job in train_jobs]
            while pending:
                done = [p for p in pending if p.ready()]
                for p in done:
                    pending.remove(p)
                    r = p.get()
                    results.append(r)
                    _progress(r, t0)
                    if r["kind"] == "train" and "bottom" in r:
                        pending.append(pool.apply_async(
                            attack_job, ("trained", r["placement"], [r["energy"]], r.pop("bottom"), r["seed"])))
                time.sleep(0.2)
    summary = summarise(results, args, placements, seeds, shared)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["quick"] = q
    print(json.dumps(summary))


def _progress(r: dict[str, Any], t0: float) -> None:
    el = time.perf_counter() - t0
    if r["kind"] == "train":
        print(f"[{el:6.0f}s] train {r['placement']:<16} E={r['energy']:<5g} seed {r['seed']}: "
              f"acc {100 * r['acc']:5.1f} "
              f"(clean {100 * r['acc_clean']:5.1f}) energy {r['relative_energy']:.3f} fallbacks {r['fallbacks']} "
              f"({r['seconds']:.0f}s)", flush=True)
    else:
        for E, v in r["results"].items():
            aw = [max(xs) for xs in zip(*(v[k] for k in AWARE if v[k]))]
            print(f"[{el:6.0f}s] attack {r['bottom']:<7} {r['placement']:<16} E={E:<5g}: decoder "
                  f"{statistics.mean(v['decoder']):5.2f}  aware {statistics.mean(aw):5.2f}  "
                  f"(from prior mean {_m(v['aware_from_prior_mean'])}, from decoder {_m(v['aware_from_decoder'])}, "
                  f"isotropic law {_m(v['aware_iso_law'])})"
                  f"{'  FALLBACK' if v['fallback'] else ''} ({r['seconds']:.0f}s)", flush=True)


def _m(xs: list[float]) -> str:
    return f"{statistics.mean(xs):5.2f}" if xs else "  -  "


def summarise(results: list[dict[str, Any]], args: dict[str, Any], placements: list[str], seeds: list[int],
              shared: dict[str, Any]) -> dict[str, Any]:
    """The JSON figures (see the module docstring)."""
    energies = args["energies"]
    key = lambda e: f"{e:g}"
    train = {(r["placement"], r["energy"], r["seed"]): r for r in results if r["kind"] == "train"}
    acc = {p: {E: statistics.mean(100 * train[(p, E, s)]["acc"] for s in seeds) for E in energies} for p in placements}
    acc_clean = {p: {E: statistics.mean(100 * train[(p, E, s)]["acc_clean"] for s in seeds) for E in energies}
                 for p in placements}
    und = statistics.mean(100 * train[("undefended", 0.0, s)]["acc"] for s in seeds)
    drops = {}
    for p in placements:
        drops[p] = {}
        for E in energies:
            d = [100 * (train[("undefended", 0.0, s)]["acc"] - train[(p, E, s)]["acc"]) for s in seeds]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
            drops[p][E] = (statistics.mean(d), se)
    # per-sample PSNRs: {(placement, E): {attack: [per-sample max over bottoms]}}
    per: dict[tuple[str, float], dict[str, list[float]]] = {}
    by_bottom: dict[tuple[str, float], dict[str, float]] = {}
    for r in results:
        if r["kind"] != "attack":
            continue
        for E, v in r["results"].items():
            aw_parts = [v[k] for k in AWARE if v[k]]
            rows = {"decoder": v["decoder"], "aware": [max(t) for t in zip(*aw_parts)], "predicted": v["predicted"],
                    **{k: v[k] for k in AWARE}}
            rows["strongest"] = [max(a, b) for a, b in zip(rows["decoder"], rows["aware"])]
            by_bottom.setdefault((r["placement"], E), {})[r["bottom"]] = statistics.mean(rows["strongest"])
            cur = per.setdefault((r["placement"], E), {})
            for k, xs in rows.items():  # over bottoms: the attacker's best case (the larger predicted PSNR too)
                cur[k] = xs if k not in cur or not cur[k] else [max(a, b) for a, b in zip(cur[k], xs)]
    mean_psnr = {p: {E: {k: statistics.mean(v) for k, v in per[(p, E)].items() if v} for E in energies}
                 for p in placements}
    attacks = ("strongest", "decoder", "aware")
    gap_equal_energy = {p: {key(E): {k: round(mean_psnr["isotropic"][E][k] - mean_psnr[p][E][k], 2) for k in attacks}
                            for E in energies} for p in placements[1:]}
    # the recommended isotropic energy and the equal-accuracy comparison
    ok = [E for E in energies if drops["isotropic"][E][0] <= args["max_drop"]]
    e_rec = max(ok) if ok else min(energies)
    frontier: dict[str, dict[str, Any]] = {}
    headline: dict[str, dict[str, float | None]] = {}
    eq_energy: dict[str, float | None] = {}
    bounds: dict[str, str | None] = {}
    for p in placements[1:]:
        frontier[p] = {}
        curve = [(E, acc[p][E]) for E in energies]
        for E_iso in energies:
            e_p, bound = first_crossing(curve, acc["isotropic"][E_iso])
            row: dict[str, Any] = {"iso_accuracy_pct": round(acc["isotropic"][E_iso], 2), "prior_energy": round(e_p, 4),
                                   "gap_bound": bound}
            for k in attacks:
                iso_v = mean_psnr["isotropic"][E_iso][k]
                pv = loglin([(E, mean_psnr[p][E][k]) for E in energies], e_p)
                suffix = "" if k == "strongest" else f"_{k}"
                row[f"iso_psnr{suffix}"] = round(iso_v, 2)
                row[f"prior_psnr{suffix}"] = round(pv, 2)
                row[f"gap_db{suffix}"] = round(iso_v - pv, 2)
            frontier[p][key(E_iso)] = row
        eq_energy[p] = frontier[p][key(e_rec)]["prior_energy"]
        bounds[p] = frontier[p][key(e_rec)]["gap_bound"]
        headline[p] = {k: frontier[p][key(e_rec)]["gap_db" + ("" if k == "strongest" else f"_{k}")] for k in attacks}
    first = placements[1]
    gap = headline[first]["strongest"]
    x_audit, prior = shared["x_audit"], shared["prior_attacker"]
    prior_mean_psnr = statistics.mean(
        float(psnr(prior.mean.reshape(SHAPE).float().clamp(0, 1), x_audit[i])) for i in range(len(x_audit)))
    # the table
    print(f"{'placement':<18}{'E':>6}{'acc':>7}{'drop':>11}{'clean':>7}{'strong':>8}{'dec':>7}{'aware':>7}{'pred':>7}")
    print(f"{'undefended':<18}{0:>6}{und:>7.1f}")
    for p in placements:
        for E in energies:
            mp_ = mean_psnr[p][E]
            se = drops[p][E][1]
            se_txt = "-" if se is None else format(se, ".1f")
            print(f"{p:<18}{E:>6g}{acc[p][E]:>7.1f}{drops[p][E][0]:>6.1f}±{se_txt:<4}"
                  f"{acc_clean[p][E]:>7.1f}"
                  f"{mp_['strongest']:>8.2f}{mp_['decoder']:>7.2f}{mp_['aware']:>7.2f}{mp_['predicted']:>7.2f}")
    for p in placements[1:]:
        for E_iso, row in frontier[p].items():
            print(f"equal accuracy {p}: iso E={E_iso} acc {row['iso_accuracy_pct']:.1f} -> "
                  f"prior E={row['prior_energy']} "
                  f"gap {row['gap_db']} (decoder {row['gap_db_decoder']}, aware {row['gap_db_aware']})"
                  f"{'' if row['gap_bound'] is None else ' [' + row['gap_bound'] + ' bound]'}")
    rnd = lambda v: None if v is None else round(v, 2)
    return {
        "embedding_psnr_gap_db_equal_accuracy": rnd(gap),
        "embedding_psnr_gap_db_equal_accuracy_decoder": rnd(headline[first]["decoder"]),
        "embedding_psnr_gap_db_equal_accuracy_aware": rnd(headline[first]["aware"]),
        "embedding_psnr_gap_db_equal_accuracy_by_floor": {label(p): rnd(headline[p]["strongest"])
                                                         for p in placements[1:] if p != "waterfill"},
        **({"embedding_psnr_gap_db_equal_accuracy_waterfill": {k: rnd(headline["waterfill"][k]) for k in attacks},
            "embedding_psnr_gap_db_equal_accuracy_waterfill_bound": bounds["waterfill"]}
           if "waterfill" in placements else {}),
        "embedding_psnr_gap_db_equal_accuracy_bound": bounds[first],
        "target_gap_db": TARGET_GAP_DB,
        "target_met": gap is not None and gap >= TARGET_GAP_DB and bounds[first] != "upper",
        "recommended_energy": e_rec,
        "recommended_energy_fallback": not ok,
        "iso_accuracy_at_recommended_pct": round(acc["isotropic"][e_rec], 2),
        "equal_accuracy_energy": {label(p): eq_energy[p] for p in placements[1:]},
        "equal_accuracy_frontier": {label(p): frontier[p] for p in placements[1:]},
        "psnr_gap_db_equal_energy": {label(p): gap_equal_energy[p] for p in placements[1:]},
        "psnr_db": {p: {key(E): {**{k: round(v, 2) for k, v in mean_psnr[p][E].items()},
                                 "by_bottom": {b: round(v, 2) for b, v in by_bottom[(p, E)].items()}}
                        for E in energies} for p in placements},
        "accuracy_pct": {"undefended": {"0": round(und, 2)},
                         **{p: {key(E): round(acc[p][E], 2) for E in energies} for p in placements}},
        "accuracy_clean_pct": {p: {key(E): round(acc_clean[p][E], 2) for E in energies} for p in placements},
        "accuracy_seeds_pct": {f"{p}@{E:g}": [round(100 * train[(p, E, s)]["acc"], 1) for s in seeds]
                               for p in ["undefended", *placements]
                               for E in ([0.0] if p == "undefended" else energies)},
        "accuracy_drop_pts": {p: {key(E): [round(drops[p][E][0], 2), rnd(drops[p][E][1])] for E in energies}
                              for p in placements},
        "relative_energy": {p: {key(E): round(statistics.mean(train[(p, E, s)]["relative_energy"] for s in seeds), 4)
                                for E in energies} for p in placements},
        "fallbacks": sum(r["fallbacks"] for r in train.values())
        + sum(int(v["fallback"]) for r in results if r["kind"] == "attack" for v in r["results"].values()),
        "prior_mean_psnr_db": round(prior_mean_psnr, 2),
        "settings": {**{k: v for k, v in args.items()}, "m": 16 * args["channels"], "d": math.prod(SHAPE),
                     "target_gap_db": TARGET_GAP_DB},
    }


if __name__ == "__main__":
    main()
