"""Risk logging: train briefly with the defenses, read the TensorBoard event files back, check the values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tbparse import SummaryReader
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from invdefend.data import digits_split
from invdefend.defense import EmbeddingDefense, GradientDefense
from invdefend.models import MLP, SplitModel
from invdefend.monitor import ReleaseRecord, RiskMonitor, format_refreshes

PSNR_FLOOR = 10 * math.log10(12)  # a release that reveals nothing: InvLoss = v0 = 1/12


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def train_gradient_run(writer, steps: int, budget: float, callbacks=()) -> GradientDefense:
    x_train, y_train, _, _ = digits_split(seed=0)
    torch.manual_seed(0)
    model = small_cnn()
    criterion = nn.CrossEntropyLoss()
    defense = GradientDefense(model, criterion, budget=budget, k=64, refresh_every=5, seed=0, writer=writer,
                              callbacks=callbacks)
    optimizer = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (16,), generator=gen)
        optimizer.zero_grad()
        criterion(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
    return defense


def scalars(log_dir) -> dict[str, np.ndarray]:
    df = SummaryReader(str(log_dir)).scalars
    return {tag: group.sort_values("step")["value"].to_numpy() for tag, group in df.groupby("tag")}


def test_gradient_risk_scalars_read_back_from_the_event_files(tmp_path) -> None:
    budget, steps = 0.05, 16
    writer = SummaryWriter(log_dir=str(tmp_path))  # the user's own writer
    seen: list[ReleaseRecord] = []
    defense = train_gradient_run(writer, steps, budget, callbacks=[seen.append])
    writer.close()
    tags = scalars(tmp_path)
    g = "invdefend/gradient/"
    for name in ("risk/predicted_psnr_mean", "risk/predicted_psnr_p95", "risk/predicted_psnr_max",
                 "risk/leakage_mean", "risk/leakage_p95", "risk/leakage_max",
                 "risk/undefended_predicted_psnr_mean", "risk/undefended_predicted_psnr_max",
                 "noise/relative_energy", "budget/relative_energy_target", "fallback",
                 "estimator/max_residual", "estimator/sweeps", "estimator/seconds"):
        assert g + name in tags, (name, sorted(tags))
    refreshes = math.ceil(steps / 5)
    psnr = tags[g + "risk/predicted_psnr_max"]
    assert len(psnr) == refreshes
    assert np.isfinite(psnr).all() and (psnr >= PSNR_FLOOR - 1e-6).all()
    assert (tags[g + "risk/predicted_psnr_mean"] <= psnr + 1e-9).all()
    # The defense lowers the risk of the same samples.
    assert (psnr < tags[g + "risk/undefended_predicted_psnr_max"]).all()
    for stat in ("mean", "p95", "max"):
        leak = tags[g + f"risk/leakage_{stat}"]
        assert ((leak >= 0) & (leak <= 1)).all()
    energy = tags[g + "noise/relative_energy"]
    assert len(energy) == steps and (energy > 0).all()
    assert 0.4 * budget < float(energy.mean()) < 1.6 * budget
    assert np.allclose(tags[g + "budget/relative_energy_target"], budget)
    assert (tags[g + "fallback"] == 0).all()
    assert (tags[g + "estimator/sweeps"] >= 0).all()
    hist = SummaryReader(str(tmp_path)).histograms
    assert (hist["tag"] == g + "spectrum/log10_singular_values").sum() == refreshes
    # The plain callback saw every release, the same values as TensorBoard.
    assert len(seen) == steps and np.allclose([r.relative_energy for r in seen], energy)
    assert defense.monitor.writer is writer


def test_fallback_is_logged_as_a_step_function(tmp_path) -> None:
    monitor = RiskMonitor(log_dir=str(tmp_path), prefix="client0")
    for step, fallback in enumerate([False, False, True, True, False, False]):
        monitor.emit(ReleaseRecord(kind="gradient", step=step, mechanism="fallback" if fallback else "spectral",
                                   relative_energy=0.5 if fallback else 0.05, budget=0.5 if fallback else 0.05,
                                   refreshed=step in (0, 2), fallback=fallback,
                                   fallback_reason="injected" if fallback else ""))
    monitor.close()
    df = SummaryReader(str(tmp_path)).scalars
    fb = df[df["tag"] == "invdefend/client0/gradient/fallback"].sort_values("step")
    # Written on refreshes and around every change: the 0 → 1 → 0 shape is exact.
    assert list(zip(fb["step"], fb["value"])) == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)]
    energy = df[df["tag"] == "invdefend/client0/gradient/noise/relative_energy"]
    assert len(energy) == 6


def test_embedding_risk_scalars_with_a_log_dir_monitor(tmp_path) -> None:
    x_train, y_train, _, _ = digits_split(seed=0)
    x_train = x_train.flatten(1)
    torch.manual_seed(0)
    bottom = MLP(64, hidden=(32,), out_features=8, activation="relu", final_activation=True)
    model = SplitModel(bottom, MLP(8, hidden=(16,), out_features=10))
    monitor = RiskMonitor(log_dir=str(tmp_path / "emb"))
    defense = EmbeddingDefense(bottom, budget=0.1, seed=0, monitor=monitor).attach()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        idx = torch.randint(0, len(x_train), (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    defense.detach()
    monitor.close()
    tags = scalars(tmp_path / "emb")
    e = "invdefend/embedding/"
    psnr = tags[e + "risk/predicted_psnr_max"]
    assert len(psnr) == 6 and np.isfinite(psnr).all() and (psnr >= PSNR_FLOOR - 1e-6).all()
    assert ((tags[e + "risk/leakage_max"] >= 0) & (tags[e + "risk/leakage_max"] <= 1)).all()
    assert tags[e + "noise/relative_energy"].mean() == pytest.approx(0.1, rel=0.25)


def test_format_refreshes_lists_refresh_steps_and_their_means() -> None:
    records = [
        ReleaseRecord("gradient", 0, "spectral", 0.05, 0.05, refreshed=True, predicted_psnr=[12.0, 14.0],
                      undefended_predicted_psnr=[70.0, 80.0]),
        ReleaseRecord("gradient", 1, "spectral", 0.04, 0.05),  # between refreshes: no risk, not listed
        ReleaseRecord("gradient", 2, "spectral", 0.06, 0.05, refreshed=True, predicted_psnr=[10.0],
                      undefended_predicted_psnr=[60.0]),
    ]
    lines = format_refreshes(records).splitlines()
    assert len(lines) == 5
    assert lines[2].split() == ["0", "80.00", "14.00", "0.0500"]
    assert lines[3].split() == ["2", "60.00", "10.00", "0.0600"]
    assert lines[4].endswith("undefended 70.00 dB, defended 12.00 dB")
    assert len(format_refreshes([]).splitlines()) == 2  # the header only
