"""The ``invdefend demo``: train a small CNN on scikit-learn's digits with and without the gradient defense.

Each run is the same seeded training (same initial weights, same batch order); only the defense differs:

* ``undefended`` — a plain loop. A :class:`~invdefend.GradientDefense` in ``mechanism="monitor"`` mode
  (no noise) measures the risk of what it shares, outside the timed step;
* ``spectral`` — the same loop with the two added lines of the README
  (``defense = GradientDefense(...)``; ``optimizer = defense.wrap(optimizer)``);
* ``isotropic`` — the same noise energy spread evenly (the DP-SGD-like baseline): one switch away
  (``mechanism="isotropic"``).

Every run logs to TensorBoard under ``<out>/<run name>`` (tags ``invdefend/gradient/...``). The demo prints a
table (test accuracy, mean and max predicted PSNR of the probed samples, noise energy, step-time ratio)
and writes ``<out>/risk.png`` (predicted PSNR over training).

The pieces are separate so that more steps (an attack audit of the trained models) can be appended:
:func:`train_runs` returns every run's :class:`RunResult` — trained model included — and the data split.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import digits_split
from .defense import GradientDefense
from .monitor import ReleaseRecord, RiskMonitor

__all__ = [
    "digits_cnn", "DemoConfig", "RunResult", "DemoRuns", "DemoResult", "train_run", "train_runs", "format_table",
    "summarize", "plot_risk", "run_demo",
]

MECHANISMS = ("monitor", "spectral", "isotropic")
RUN_NAMES = {"monitor": "undefended", "spectral": "spectral", "isotropic": "isotropic"}


def digits_cnn() -> nn.Module:
    """The demo's small CNN for ``(B, 1, 8, 8)`` digits: two 3×3 convolutions (16 and 32 channels, the second
    with stride 2), ReLU, and a linear classifier — 9,930 parameters, about 97.5 % test accuracy."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@dataclass
class DemoConfig:
    """Settings of the demo (the CLI flags of ``invdefend demo``).

    Attributes:
        out: directory for the TensorBoard runs and the PNG.
        epochs: passes over the 1347 training digits.
        seed: seeds the weights, the batch order, the probes and the noise.
        budget: the defense's noise energy relative to ``‖ḡ‖²``.
        k, probes, refresh_every: the defense's estimator settings (see :class:`GradientDefense`); the
            default ``k=64`` covers the whole 8×8 input, so the spectrum (and the risk) is exact.
        batch_size, lr, momentum: the SGD loop (with a cosine learning-rate decay to 0).
        mechanisms: runs to make, among ``"monitor"`` (undefended), ``"spectral"``, ``"isotropic"``.
        threads: torch intra-op threads during the runs (1: this CNN is far too small to gain from more).
        audit_samples: test digits attacked after training (at the initial weights, undefended and defended;
            :func:`invdefend.audit.quick_audit`); when the spectral run is on, the band-pass defense at the same
            total energy (a quarter of it as isotropic floor) is audited too; 0 skips the audit.
    """

    out: str = "runs"
    epochs: int = 12
    seed: int = 0
    budget: float = 0.05
    k: int = 64
    probes: int = 2
    refresh_every: int = 50
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    mechanisms: tuple[str, ...] = ("monitor", "spectral", "isotropic")
    threads: int = 1
    audit_samples: int = 3

    def __post_init__(self) -> None:
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if unknown or not self.mechanisms:
            raise ValueError(f"invdefend.demo: mechanisms={self.mechanisms!r}; choose among {MECHANISMS}")
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("invdefend.demo: epochs, batch_size and threads must be >= 1")


@dataclass
class RunResult:
    """One training run of the demo.

    Attributes:
        name: ``"undefended"``, ``"spectral"`` or ``"isotropic"``.
        mechanism: the :class:`GradientDefense` mechanism used (``"monitor"`` for the undefended run).
        accuracy: test accuracy of the final model.
        records: every :class:`ReleaseRecord` of the run (one per step).
        step_seconds: wall time of each training step (forward, backward, protection, update); for the
            undefended run the monitoring is outside it.
        refreshed: per step, whether the defense re-estimated the spectrum on it.
        model: the trained model (for audits appended after training).
        log_dir: its TensorBoard directory.
    """

    name: str
    mechanism: str
    accuracy: float
    records: list[ReleaseRecord]
    step_seconds: list[float]
    refreshed: list[bool]
    model: nn.Module
    log_dir: Path
    wall_seconds: float
    final_loss: float
    extra: dict[str, Any] = field(default_factory=dict)

    def risk(self, stat: str = "mean") -> float:
        """Mean (``"mean"``) or largest (``"max"``) predicted PSNR of the probed samples over training."""
        values = [v for r in self.records for v in r.predicted_psnr]
        if not values:
            return float("nan")
        return float(np.mean(values) if stat == "mean" else np.max(values))

    def undefended_risk(self, stat: str = "mean") -> float:
        """The same samples' predicted PSNR without the defense's noise (reference attacker precision only)."""
        values = [v for r in self.records for v in r.undefended_predicted_psnr]
        if not values:
            return float("nan")
        return float(np.mean(values) if stat == "mean" else np.max(values))

    def noise_energy(self) -> float:
        """Mean released noise energy relative to ``‖ḡ‖²`` over training."""
        return float(np.mean([r.relative_energy for r in self.records])) if self.records else 0.0

    def fallbacks(self) -> int:
        """Steps released with conservative fallback noise."""
        return sum(r.fallback for r in self.records)

    def step_time(self) -> float:
        """Amortised seconds per step: per-kind medians (refresh / other) weighted by how often each ran.

        The first step (cold spectrum estimate and ``torch.func``'s one-time warm-up) is excluded.
        """
        times, flags = self.step_seconds[1:], self.refreshed[1:]
        if not times:
            return float("nan")
        other = [t for t, f in zip(times, flags) if not f]
        fresh = [t for t, f in zip(times, flags) if f]
        parts = [(statistics.median(x), len(x)) for x in (other, fresh) if x]
        return sum(med * n for med, n in parts) / sum(n for _, n in parts)


@dataclass
class DemoRuns:
    """What :func:`train_runs` returns: every run and the data they used."""

    config: DemoConfig
    runs: list[RunResult]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def by_name(self, name: str) -> RunResult:
        """The run called ``name``."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"invdefend.demo: no run named {name!r}; runs are {[r.name for r in self.runs]}")


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was)
    return acc


def train_run(
    mechanism: str,
    config: DemoConfig,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    initial: nn.Module,
) -> RunResult:
    """Train a copy of ``initial`` on the digits with ``mechanism`` and log it under ``config.out``."""
    x_train, y_train, x_test, y_test = data
    name = RUN_NAMES[mechanism]
    log_dir = Path(config.out) / name
    model = copy.deepcopy(initial)
    criterion = nn.CrossEntropyLoss()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    monitor = RiskMonitor(log_dir=str(log_dir))
    defense = GradientDefense(
        model, criterion, budget=config.budget, mechanism=mechanism, k=config.k, probes=config.probes,
        refresh_every=config.refresh_every, seed=config.seed, monitor=monitor,
    )
    if mechanism != "monitor":
        optimizer = defense.wrap(optimizer)  # the README's second line: step() now protects first
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(config.seed)
    step_seconds: list[float] = []
    refreshed: list[bool] = []
    loss_value = float("nan")
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            perm = torch.randperm(len(x_train), generator=order)
            for i in range(0, len(x_train), config.batch_size):
                idx = perm[i : i + config.batch_size]
                x, y = x_train[idx], y_train[idx]
                t0 = time.perf_counter()
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                if mechanism == "monitor":
                    t_monitor = time.perf_counter()
                    defense.protect()  # measures and logs risk; adds no noise
                    t0 += time.perf_counter() - t_monitor  # keep the monitoring out of the plain step time
                optimizer.step()
                schedule.step()
                step_seconds.append(time.perf_counter() - t0)
                refreshed.append(bool(defense.last_record.refreshed))
                loss_value = loss.item()
            monitor.writer.add_scalar("invdefend/demo/test_accuracy", _accuracy(model, x_test, y_test), defense.step)
            monitor.writer.add_scalar("invdefend/demo/train_loss", loss_value, defense.step)
    finally:
        defense.detach()
        monitor.close()
    return RunResult(
        name=name, mechanism=mechanism, accuracy=_accuracy(model, x_test, y_test), records=list(monitor.history),
        step_seconds=step_seconds, refreshed=refreshed, model=model, log_dir=log_dir,
        wall_seconds=time.perf_counter() - start, final_loss=loss_value,
    )


def train_runs(config: DemoConfig) -> DemoRuns:
    """Every run of ``config`` from the same initial weights and batch order; returns them and the data."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        data = digits_split(seed=config.seed)
        torch.manual_seed(config.seed)
        initial = digits_cnn()
        runs = [train_run(m, config, data, initial) for m in config.mechanisms]
    finally:
        torch.set_num_threads(previous_threads)
    return DemoRuns(config, runs, *data)


def format_table(runs: Sequence[RunResult]) -> str:
    """The demo's summary table as text (one row per run)."""
    plain = next((r for r in runs if r.mechanism == "monitor"), None)
    base_time = plain.step_time() if plain is not None else float("nan")
    header = (f"{'run':<11} {'test acc':>8} {'pred. PSNR mean':>15} {'max':>7} {'noise energy':>12} "
              f"{'step time':>9} {'fallbacks':>9}")
    lines = [header, "-" * len(header)]
    for r in runs:
        ratio = r.step_time() / base_time if base_time == base_time and base_time > 0 else float("nan")
        lines.append(
            f"{r.name:<11} {r.accuracy:>8.2%} {r.risk('mean'):>12.1f} dB {r.risk('max'):>4.1f} dB "
            f"{r.noise_energy():>12.3f} {ratio:>8.2f}x {r.fallbacks():>9d}"
        )
    lines.append(
        "pred. PSNR: predicted PSNR of the probed training samples' gradients (higher = easier to reconstruct; "
        "10.8 dB = nothing learned).\nnoise energy: ‖noise‖²/‖mean gradient‖². step time: amortised over "
        "the refresh period, relative to the undefended step; the spectrum's cost is per probe sample, so it "
        "weighs most on a\nmodel this small (benchmarks/overhead.py measures LeNet on 32x32 images)."
    )
    return "\n".join(lines)


def plot_risk(runs: Sequence[RunResult], path: str | Path) -> Path:
    """Write a PNG of predicted PSNR (max and mean over the probes) over training for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        pts = [(rec.step, max(rec.predicted_psnr), float(np.mean(rec.predicted_psnr)))
               for rec in r.records if rec.predicted_psnr]
        if not pts:
            continue
        steps, top, mean = map(np.asarray, zip(*pts))
        line, = ax.plot(steps, top, label=f"{r.name} (max over probes)")
        ax.plot(steps, mean, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{r.name} (mean)")
    ax.axhline(10 * np.log10(12), color="gray", linestyle=":", linewidth=1, label="reveals nothing (10.8 dB)")
    ax.set_xlabel("training step")
    ax.set_ylabel("predicted PSNR (dB)")
    ax.set_title("Reconstruction risk of the shared gradients (digits CNN)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """The table's figures per run, as a JSON-friendly dict (what ``<out>/summary.json`` holds)."""
    plain = next((r for r in runs if r.mechanism == "monitor"), None)
    base = plain.step_time() if plain is not None else float("nan")
    return {
        r.name: {
            "mechanism": r.mechanism,
            "test_accuracy": r.accuracy,
            "predicted_psnr_mean": r.risk("mean"),
            "predicted_psnr_max": r.risk("max"),
            "undefended_predicted_psnr_mean": r.undefended_risk("mean"),
            "undefended_predicted_psnr_max": r.undefended_risk("max"),
            "noise_energy": r.noise_energy(),
            "step_time_ratio": r.step_time() / base,
            "step_seconds": r.step_time(),
            "fallbacks": r.fallbacks(),
            "wall_seconds": r.wall_seconds,
            "steps": len(r.step_seconds),
            "log_dir": str(r.log_dir),
        }
        for r in runs
    }


@dataclass
class DemoResult:
    """Everything the demo produced."""

    runs: DemoRuns
    table: str
    png: Path
    summary: Path


def run_demo(config: DemoConfig | None = None, *, verbose: bool = True) -> DemoResult:
    """Train the runs, print the table, write the PNG; returns all of it."""
    config = config or DemoConfig()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"invdefend demo: a small CNN on scikit-learn digits, {config.epochs} epochs, runs: "
              f"{', '.join(RUN_NAMES[m] for m in config.mechanisms)} (budget {config.budget}); logging to {config.out}/",
              flush=True)
    runs = train_runs(config)
    table = format_table(runs.runs)
    png = plot_risk(runs.runs, Path(config.out) / "risk.png")
    summary = Path(config.out) / "summary.json"
    summary.write_text(json.dumps({"config": asdict(config), "runs": summarize(runs.runs)}, indent=2) + "\n")
    if verbose:
        print(table)
        for r in runs.runs:
            print(f"  {r.name}: {r.wall_seconds:.1f} s, final train loss {r.final_loss:.3f}, "
                  f"TensorBoard run {r.log_dir}")
        plain = next((r for r in runs.runs if r.mechanism == "monitor"), None)
        if plain is not None:
            print(f"  undefended predicted PSNR of the same samples: mean {plain.undefended_risk('mean'):.1f} dB, "
                  f"max {plain.undefended_risk('max'):.1f} dB")
        print(f"  risk plot: {png}; figures: {summary}\n  view the runs: tensorboard --logdir {config.out}")
    if config.audit_samples > 0:  # real attacks on the initial weights (where they are strongest), batch of one
        from .audit import format_summary, quick_audit

        torch.manual_seed(config.seed)
        initial = digits_cnn().eval()
        noisy = "spectral" if "spectral" in config.mechanisms else "isotropic"
        audit = quick_audit(initial, nn.functional.cross_entropy, runs.x_test, runs.y_test, defenses=("none", noisy),
                            budget=config.budget, n=config.audit_samples, out_dir=Path(config.out) / "audit",
                            seed=config.seed)
        summary_rows = dict(audit["summary"])
        grids = [audit["files"]["grid"]]
        if noisy == "spectral":
            # The setting the frontier study recommends when attackers may know the noise, at the same total
            # energy: three quarters band-pass noise, one quarter isotropic floor (docs/frontier_uniform_init.md).
            band = quick_audit(initial, nn.functional.cross_entropy, runs.x_test, runs.y_test, defenses=("band_pass",),
                               budget=0.75 * config.budget, floor=0.25 * config.budget, n=config.audit_samples,
                               out_dir=Path(config.out) / "audit-band-pass", seed=config.seed)
            summary_rows.update(band["summary"])
            grids.append(band["files"]["grid"])
        if verbose:
            print(f"attack audit: DLG, Inverting Gradients and the defense-aware attack on {config.audit_samples} "
                  "test digits' gradients at the initial weights (PSNR in dB, capped at 60; band_pass = "
                  "GradientDefense(mechanism='band_pass') with a quarter of the energy as isotropic floor):")
            print(format_summary(summary_rows))
            print(f"  originals vs reconstructions: {', '.join(grids)}")
    return DemoResult(runs, table, png, summary)
