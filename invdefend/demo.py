"""The ``invdefend demo``: a private face rebuilt from its gradient, then protected.

The data is scikit-image's ``lfw_subset`` (200 grayscale 25x25 crops: 100 faces, 100 non-faces), which ships
with the install. A small CNN learns face vs non-face three times from the same initial weights and batch
order; only the defense differs:

* ``undefended`` — a plain loop; a :class:`~invdefend.GradientDefense` in ``mechanism="monitor"`` mode measures
  the risk of what it shares (no noise, outside the timed step);
* the library's **default** defense (``mechanism="spectral"``: half the energy an isotropic floor, half — at
  most ``1·‖ḡ‖²``, the rest joining the floor — shaped by the prior-whitened Jacobian spectrum) at the demo's
  ``budget``, two changed lines;
* ``isotropic`` — the same noise energy spread evenly (the DP-SGD-like baseline).

Accuracy is cross-validated over ``folds`` stratified folds (40 test images are too few to resolve one point).
The first fold's runs log to TensorBoard under ``<out>/<run>``, with the reconstruction of one probe at every
spectrum refresh (:class:`~invdefend.GradientDefense` ``reconstruct_probe``).

Then held-out faces' gradients (batch of one, at the initial weights, where attacks are strongest) are attacked
under each release by every attack of the audit suite: Inverting Gradients, DLG, and the defense-aware MAP
attack with an i.i.d. prior, with a Gaussian image prior fitted on the training images, and with a face prior
fitted on the training faces (the attacker reads the label off the gradient). Each face's strongest attack is
the one with the highest SSIM. The demo writes:

* ``<out>/faces.png`` — original, rebuilt undefended, under the default defense, under isotropic noise of equal
  energy, and the average training face (what the face-prior attacker knows before it sees any gradient),
  each with its PSNR and SSIM;
* ``<out>/report.html`` — the audit report (:func:`invdefend.report.write_html_report`);
* ``<out>/summary.json`` — every figure of the printed table.

Every PSNR the demo prints is capped at :data:`CAP_DB` (an exact recovery is "60 dB"), the predicted and the
attacked alike.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .audit import AuditReport, audit, fit_attacker_priors
from .data import FACE_LABELS, face_folds, load_faces
from .defense import DefenseSettings, GradientDefense
from .metrics import PSNR_CAP_DB, psnr, ssim
from .models import two_conv_cnn
from .monitor import ReleaseRecord, RiskMonitor

__all__ = [
    "ATTACKS",
    "CAP_DB",
    "DemoConfig",
    "DemoResult",
    "FoldRuns",
    "RunResult",
    "attack_faces",
    "baseline_scores",
    "face_cnn",
    "format_table",
    "plot_story",
    "run_demo",
    "summarize",
    "train_fold",
    "train_run",
]

#: PSNR cap (dB) of every figure the demo prints, predicted or attacked: "recovered exactly".
CAP_DB: float = PSNR_CAP_DB
#: The attacks run on every face; the strongest (highest SSIM) counts.
ATTACKS: tuple[str, ...] = ("ig", "dlg", "aware", "prior", "class_prior")
#: The demo's runs: run name -> GradientDefense mechanism (``"monitor"``: no noise).
RUNS: dict[str, str] = {"undefended": "monitor", "default": "spectral", "isotropic": "isotropic"}


def face_cnn() -> nn.Module:
    """The demo's CNN for ``(B, 1, 25, 25)`` faces (:func:`invdefend.models.two_conv_cnn`: 8 and 16 channels, the
    second convolution with stride 2, ReLU, a linear face / non-face classifier) — 6,658 parameters."""
    return two_conv_cnn(8, 25, len(FACE_LABELS))


@dataclass
class DemoConfig:
    """Settings of the demo (the flags of ``invdefend demo``).

    Attributes:
        out: directory for the TensorBoard runs, the PNG, the HTML report and ``summary.json``.
        budget: noise energy relative to ``‖ḡ‖²`` of both noisy runs (the default defense's total, its floor
            included, and the isotropic run's).
        epochs, batch_size, lr, momentum: the SGD loop (cosine learning-rate decay to 0, horizontal flips).
        clip: every run clips ``‖ḡ‖`` to this before the step (and so before the noise, which scales with it).
        folds: stratified folds of the cross-validated accuracy (1: train on 160, test on 40, once).
        seed: seeds the weights, the folds, the batch order, the probes, the noise and the attacks.
        k, probes, refresh_every: the defense's estimator settings (see :class:`GradientDefense`).
        reconstruct_probe: attack iterations of the TensorBoard probe image at each refresh (0: none).
        faces: held-out faces attacked.
        attack_iterations: iterations of every attack.
        restarts: random starts of Inverting Gradients (one start sometimes stalls on a face, SSIM 0.4).
        threads: torch intra-op threads (1: this CNN gains nothing from more).
    """

    out: str = "runs"
    budget: float = 20.0
    epochs: int = 30
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    clip: float = 1.0
    folds: int = 5
    seed: int = 0
    k: int = 8
    probes: int = 2
    refresh_every: int = 20
    reconstruct_probe: int = 40
    faces: int = 8
    attack_iterations: int = 200
    restarts: int = 4
    threads: int = 1
    runs: tuple[str, ...] = tuple(RUNS)

    def __post_init__(self) -> None:
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or "undefended" not in self.runs:
            raise ValueError(
                f"invdefend.demo: runs={self.runs!r}; choose among {', '.join(RUNS)}, 'undefended' included"
            )
        for name in ("epochs", "batch_size", "threads", "faces", "attack_iterations", "refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"invdefend.demo: {name}={getattr(self, name)} must be >= 1")
        if self.folds != 1:
            face_folds(self.folds)  # validates: folds must divide 100
        if not self.budget > 0:
            raise ValueError(f"invdefend.demo: budget={self.budget} must be > 0 (e.g. budget=20)")


@dataclass
class RunResult:
    """One training run of one fold.

    Attributes:
        name, mechanism: the run (``"undefended"``, ``"default"``, ``"isotropic"``) and its mechanism.
        correct, tested: held-out images classified right, and held out.
        records: every :class:`ReleaseRecord` of the run.
        step_seconds, refreshed: wall time of each step (the undefended run's monitoring excluded) and
            whether the defense re-estimated the spectrum on it.
        log_dir: the TensorBoard run (first fold only), else None.
    """

    name: str
    mechanism: str
    correct: int
    tested: int
    records: list[ReleaseRecord]
    step_seconds: list[float]
    refreshed: list[bool]
    log_dir: Path | None
    final_loss: float

    def step_time(self) -> float:
        """Amortised seconds per step: per-kind medians (refresh / other) weighted by how often each ran; the
        first step (cold estimate, ``torch.func`` warm-up) excluded."""
        times, flags = self.step_seconds[1:], self.refreshed[1:]
        parts = [(statistics.median(x), len(x)) for x in
                 ([t for t, f in zip(times, flags) if not f], [t for t, f in zip(times, flags) if f]) if x]
        return sum(m * n for m, n in parts) / sum(n for _, n in parts) if parts else float("nan")

    def noise_energy(self) -> float:
        """Mean released noise energy relative to ``‖ḡ‖²``."""
        return float(np.mean([r.relative_energy for r in self.records])) if self.records else 0.0

    def fallbacks(self) -> int:
        """Steps released with conservative fallback noise."""
        return sum(r.fallback for r in self.records)


@dataclass
class FoldRuns:
    """Every run of every fold, and the first fold's data (the attacked faces are held out of it)."""

    runs: dict[str, list[RunResult]]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    initial: nn.Module

    def accuracy(self, name: str) -> float:
        """Cross-validated accuracy of run ``name``."""
        rs = self.runs[name]
        return sum(r.correct for r in rs) / sum(r.tested for r in rs)


def fold_data(folds: int, seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(x_train, y_train, x_test, y_test)`` of every fold, the faces loaded once; one fold: a stratified
    160 / 40 split (the first of five)."""
    x, y = load_faces()
    parts = face_folds(5 if folds == 1 else folds, seed)
    out = []
    for fold in range(folds):
        train, test = torch.cat([p for j, p in enumerate(parts) if j != fold]), parts[fold]
        out.append((x[train], y[train], x[test], y[test]))
    return out


def _flip(x: Tensor, gen: torch.Generator) -> Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_run(
    name: str,
    config: DemoConfig,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    initial: nn.Module,
    log_dir: Path | None,
) -> RunResult:
    """Train a copy of ``initial`` with run ``name``'s defense; log to ``log_dir`` when given."""
    x_train, y_train, x_test, y_test = data
    mechanism = RUNS[name]
    model = copy.deepcopy(initial)
    criterion = nn.CrossEntropyLoss()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    monitor = RiskMonitor(log_dir=str(log_dir) if log_dir is not None else None)
    defense = GradientDefense(
        model, criterion, budget=config.budget, mechanism=mechanism, k=config.k, probes=config.probes,
        refresh_every=config.refresh_every, seed=config.seed, monitor=monitor,
        reconstruct_probe=config.reconstruct_probe if log_dir is not None else 0,
    )
    if mechanism != "monitor":
        optimizer = defense.wrap(optimizer)  # the README's second line: step() now protects first
    steps = config.epochs * -(-len(x_train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(config.seed)
    step_seconds: list[float] = []
    refreshed: list[bool] = []
    loss_value = float("nan")
    try:
        for _ in range(config.epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(x_train), config.batch_size):
                idx = perm[i : i + config.batch_size]
                x, y = _flip(x_train[idx], gen), y_train[idx]
                t0 = time.perf_counter()
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                # The same clipping in every run: the noise scales with ‖ḡ‖, so a large-noise step can otherwise
                # feed on itself (a NaN at budget 20 without it).
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                if mechanism == "monitor":
                    t_monitor = time.perf_counter()
                    defense.protect()  # measures and logs the risk; adds no noise
                    t0 += time.perf_counter() - t_monitor
                optimizer.step()
                schedule.step()
                # The TensorBoard probe image is a diagnostic, not part of the protected step: its time is left out
                # (the undefended run's protect(), probe included, is already outside t0).
                probe = (defense.last_record.extra.get("probe_attack") or {}) if mechanism != "monitor" else {}
                step_seconds.append(time.perf_counter() - t0 - float(probe.get("seconds", 0.0)))
                refreshed.append(bool(defense.last_record.refreshed))
                loss_value = loss.item()
            if monitor.writer is not None:
                monitor.writer.add_scalar("invdefend/demo/test_accuracy", _correct(model, x_test, y_test) / len(x_test),
                                          defense.step)
                monitor.writer.add_scalar("invdefend/demo/train_loss", loss_value, defense.step)
    finally:
        defense.detach()
        monitor.close()
    return RunResult(name, mechanism, _correct(model, x_test, y_test), len(x_test), list(monitor.history),
                     step_seconds, refreshed, log_dir, loss_value)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        right = int((model(x).argmax(dim=1) == y).sum())
    model.train(was)
    return right


def train_fold(
    config: DemoConfig, fold: int, initial: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> dict[str, RunResult]:
    """Every run of ``config`` on ``fold``'s ``data`` (:func:`fold_data`) from ``initial``; fold 0 logs to
    TensorBoard."""
    return {name: train_run(name, config, data, initial, Path(config.out) / name if fold == 0 else None)
            for name in config.runs}


def train_folds(config: DemoConfig) -> FoldRuns:
    """Train every run on every fold (the same initial weights and batch order throughout)."""
    torch.manual_seed(config.seed)
    initial = face_cnn()
    splits = fold_data(config.folds, config.seed)
    runs: dict[str, list[RunResult]] = {name: [] for name in config.runs}
    for fold, data in enumerate(splits):
        for name, r in train_fold(config, fold, initial, data).items():
            runs[name].append(r)
    return FoldRuns(runs, *splits[0], initial=initial)


def attack_faces(config: DemoConfig, folds: FoldRuns, progress: Callable[[str], None] | None = None) -> AuditReport:
    """Attack ``config.faces`` held-out faces' batch-of-one gradients at the initial weights, undefended and under
    each noisy run's defense at ``config.budget``; every attack of :data:`ATTACKS`, strongest by SSIM."""
    faces = folds.x_test[folds.y_test == 0][: config.faces]
    labels = torch.zeros(len(faces), dtype=torch.long)
    # The attacker's image prior on the training images, and a face prior (never the attacked faces).
    prior, class_priors = fit_attacker_priors(folds.x_train, folds.y_train, labels)
    defenses = [RUNS[name] if name != "undefended" else "none" for name in config.runs]
    return audit(
        copy.deepcopy(folds.initial).eval(), nn.functional.cross_entropy, faces, labels,
        attacks=ATTACKS, defenses=defenses, budget=config.budget, iterations=config.attack_iterations, cap_db=CAP_DB,
        seed=config.seed, prior=prior, class_priors=class_priors, select_by="ssim", restarts=config.restarts,
        progress=progress,
    )


def baseline_scores(folds: FoldRuns, report: AuditReport) -> tuple[Tensor, list[float], list[float]]:
    """The average training face (the face-prior attacker's guess before it sees a gradient), and its PSNR and
    SSIM against each attacked face."""
    assert report.originals is not None
    mean_face = folds.x_train[folds.y_train == 0].mean(dim=0, keepdim=True)
    target = report.originals
    guess = mean_face.expand_as(target)
    return mean_face[0], [float(v) for v in psnr(guess, target, max_db=CAP_DB)], [float(v) for v in ssim(guess, target)]


def reidentification_ranks(reconstructions: Tensor, originals: Tensor, gallery: Tensor) -> list[int]:
    """Per reconstruction, the rank of its own original among ``gallery`` (every held-out face, the originals
    included) by SSIM to the reconstruction: 1 when the rebuild is more like its face than like any other
    held-out face (re-identified); ``len(gallery) / 2`` on average when it says nothing about which face it was."""
    ranks = []
    for rec, own in zip(reconstructions, originals, strict=True):
        scores = ssim(rec.expand_as(gallery), gallery)
        ranks.append(1 + int((scores > float(ssim(rec[None], own[None])[0])).sum()))
    return ranks


def _rows(report: AuditReport, defense: str) -> list[Any]:
    return [s for s in report.samples if s.defense == defense]


def summarize(config: DemoConfig, folds: FoldRuns, report: AuditReport, baseline: tuple[Tensor, list[float], list[float]]
              ) -> dict[str, Any]:
    """Every figure of the table per run, and the attacked faces', as a JSON-friendly dict."""
    base = statistics.fmean(r.step_time() for r in folds.runs["undefended"])
    gallery = folds.x_test[folds.y_test == 0]
    assert report.originals is not None
    out: dict[str, Any] = {}
    for name in config.runs:
        rs = folds.runs[name]
        defense = "none" if name == "undefended" else RUNS[name]
        rows = _rows(report, defense)
        predicted = [min(v, CAP_DB) for r in rs[0].records for v in r.predicted_psnr]
        ranks = reidentification_ranks(report.reconstructions[defense], report.originals, gallery)
        out[name] = {
            "mechanism": RUNS[name],
            "accuracy": folds.accuracy(name),
            "accuracy_per_fold": [r.correct / r.tested for r in rs],
            "training_predicted_psnr_max": max(predicted) if predicted else None,
            "faces_predicted_psnr": [s.predicted_psnr for s in rows],
            "faces_attacked_psnr": [s.best_psnr for s in rows],
            "faces_ssim": [s.ssim[s.best_attack] for s in rows],
            "faces_strongest_attack": [s.best_attack for s in rows],
            "faces_noise_energy": [s.relative_noise_energy for s in rows],
            "ssim_mean": statistics.fmean(s.ssim[s.best_attack] for s in rows),
            "ssim_max": max(s.ssim[s.best_attack] for s in rows),
            "faces_reid_rank": ranks,
            "reidentified": sum(r == 1 for r in ranks) / len(ranks),
            "reid_rank_median": statistics.median(ranks),
            "attacked_psnr_mean": statistics.fmean(s.best_psnr for s in rows),
            "predicted_psnr_mean": statistics.fmean(s.predicted_psnr for s in rows),
            "step_time_ratio": statistics.fmean(r.step_time() for r in rs) / base,
            "noise_energy": statistics.fmean(r.noise_energy() for r in rs),
            "fallbacks": sum(r.fallbacks() for r in rs),
            "log_dir": str(rs[0].log_dir),
        }
    mean_face, b_psnr, b_ssim = baseline
    b_ranks = reidentification_ranks(mean_face.expand_as(report.originals), report.originals, gallery)
    out["average face"] = {"faces_attacked_psnr": b_psnr, "faces_ssim": b_ssim, "ssim_mean": statistics.fmean(b_ssim),
                           "attacked_psnr_mean": statistics.fmean(b_psnr), "faces_reid_rank": b_ranks,
                           "reidentified": sum(r == 1 for r in b_ranks) / len(b_ranks),
                           "reid_rank_median": statistics.median(b_ranks), "gallery": len(gallery)}
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The demo's table: accuracy, InvRE's predicted PSNR and the strongest attack's PSNR and SSIM on the attacked
    faces, how many rebuilt faces re-identify their own face among the held-out ones (:func:`reidentification_ranks`),
    noise energy and step-time ratio, per run."""
    head = (f"{'run':<12}{'accuracy':>9}{'predicted':>11}{'attacked':>10}{'SSIM':>6}{'max':>6}{'re-id':>7}"
            f"{'noise':>7}{'step time':>11}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        reid = f"{sum(r == 1 for r in s['faces_reid_rank'])}/{len(s['faces_reid_rank'])}"
        if name == "average face":
            lines.append(f"{name:<12}{'':>9}{'':>11}{s['attacked_psnr_mean']:>7.1f} dB{s['ssim_mean']:>6.2f}"
                         f"{max(s['faces_ssim']):>6.2f}{reid:>7}")
            continue
        lines.append(
            f"{name:<12}{s['accuracy']:>8.1%}{s['predicted_psnr_mean']:>8.1f} dB{s['attacked_psnr_mean']:>7.1f} dB"
            f"{s['ssim_mean']:>6.2f}{s['ssim_max']:>6.2f}{reid:>7}{s['noise_energy']:>7.2f}{s['step_time_ratio']:>10.2f}x"
        )
    return "\n".join(lines)


def plot_story(report: AuditReport, baseline: tuple[Tensor, list[float], list[float]], summary: dict[str, Any],
               config: DemoConfig, path: str | Path) -> Path:
    """The demo's picture: per attacked face, the original, the strongest reconstruction per release, and the
    average face, each with its PSNR and SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert report.originals is not None
    mean_face, b_psnr, b_ssim = baseline
    gallery = summary["average face"]["gallery"]
    names = [n for n in config.runs]
    titles = {"undefended": "rebuilt, undefended", "default": "rebuilt, default defense",
              "isotropic": "rebuilt, isotropic noise"}
    columns = ["original", *names, "average face"]
    n = len(report.originals)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), 2.25 * n + 1.3), squeeze=False)
    for c, col in enumerate(columns):
        axes[0][c].set_title(titles.get(col, col) if col != "average face" else "average face\n(prior alone)",
                             fontsize=9)
        for r in range(n):
            ax = axes[r][c]
            if col == "original":
                img, caption = report.originals[r], f"held-out face {r + 1}"
            elif col == "average face":
                rank = summary["average face"]["faces_reid_rank"][r]
                img, caption = mean_face, f"{b_psnr[r]:.1f} dB / SSIM {b_ssim[r]:.2f}\nrank {rank} of {gallery}"
            else:
                defense = "none" if col == "undefended" else RUNS[col]
                s = _rows(report, defense)[r]
                img = report.reconstructions[defense][r]
                rank = summary[col]["faces_reid_rank"][r]
                caption = f"{s.best_psnr:.1f} dB / SSIM {s.ssim[s.best_attack]:.2f}\nrank {rank} of {gallery}"
            ax.imshow(img.detach().float().clamp(0, 1)[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=8)
    acc = ", ".join(f"{nm} {summary[nm]['accuracy']:.1%}" for nm in names)
    shaped, floor = DefenseSettings.for_kind("gradient", budget=config.budget).energy_split("gradient")
    fig.suptitle(
        f"A private face rebuilt from its gradient (batch of one, 25×25 LFW) by the strongest of {len(ATTACKS)} attacks\n"
        f"noise energy {config.budget:g}×‖g‖² (default: {floor:g} isotropic floor + {shaped:g} spectral); accuracy: {acc}\n"
        f"rank k of {gallery}: where the true face ranks among the {gallery} held-out faces by SSIM to the image "
        "(1: re-identified)",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class DemoResult:
    """Everything the demo produced."""

    folds: FoldRuns
    report: AuditReport
    summary: dict[str, Any]
    table: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def run_demo(config: DemoConfig | None = None, *, verbose: bool = True) -> DemoResult:
    """Train, attack, print the table, write the picture, the report and ``summary.json``; returns all of it."""
    from .report import write_html_report

    config = config or DemoConfig()
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        say(f"invdefend demo: face / non-face CNN on scikit-image's lfw_subset, {config.folds}-fold, "
            f"{config.epochs} epochs, runs {', '.join(config.runs)} at noise energy {config.budget:g}; logs in {out}/",
            flush=True)
        folds = train_folds(config)
        say(f"  trained in {time.perf_counter() - start:.0f} s; attacking {config.faces} held-out faces "
            f"({', '.join(ATTACKS)})", flush=True)
        report = attack_faces(config, folds)
        report.settings.update({"model": "face_cnn (6,658 parameters, initial weights)",
                                "data": "scikit-image lfw_subset, held-out faces"})
        baseline = baseline_scores(folds, report)
        summary = summarize(config, folds, report, baseline)
        table = format_table(summary)
        # The report's risk over training: the default defense's run.
        shown = next((name for name in ("default", "isotropic") if name in config.runs), "undefended")
        files = {
            "picture": plot_story(report, baseline, summary, config, out / "faces.png"),
            "report": write_html_report(report, out / "report.html", history=folds.runs[shown][0].records,
                                        title=f"invdefend demo: faces (risk over training: the {shown} run)"),
            "summary": out / "summary.json",
        }
        seconds = time.perf_counter() - start
        files["summary"].write_text(json.dumps(
            {"config": asdict(config), "runs": summary, "seconds": round(seconds, 1), "cap_db": CAP_DB},
            indent=2, default=str) + "\n")
    finally:
        torch.set_num_threads(previous)
    say(table)
    say(f"accuracy: {config.folds}-fold cross-validated. predicted: InvRE on the attacked faces' releases; attacked: "
        f"the strongest attack's PSNR (capped at {CAP_DB:g} dB) and SSIM (1 = identical); average face: what an "
        "attacker with a face prior guesses from no gradient at all. re-id: rebuilt faces more like their own face "
        f"than like any other of the {summary['average face']['gallery']} held-out faces (by SSIM; by chance 1 in "
        f"{summary['average face']['gallery']} per face). noise: ‖noise‖²/‖ḡ‖² in training; "
        "step time: relative to the undefended step.")
    say("  " + "; ".join(f"{k}: {v}" for k, v in files.items()) + f"\n  TensorBoard: tensorboard --logdir {out}"
        f"\n  done in {seconds:.0f} s")
    return DemoResult(folds, report, summary, table, files, seconds)
