"""The Lightning callback, exercised by real ``Trainer.fit`` runs on the digits (no mock of Lightning)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from invdefend.data import digits_split  # noqa: E402
from invdefend.integrations.lightning import GradientDefenseCallback  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 16


class DigitsModule(pl.LightningModule):
    """A small MLP on the 8x8 digits, trained with plain SGD (no momentum: one step = -lr * gradient)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    x, y, _, _ = digits_split()
    return DataLoader(TensorDataset(x[:256], y[:256]), batch_size=BATCH, shuffle=False)


def _trainer(tmp_path: Path | None = None, **kwargs) -> "pl.Trainer":
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run") if tmp_path is not None else False
    defaults = dict(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=4, log_every_n_steps=1)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _fit(loader: DataLoader, callbacks=(), tmp_path: Path | None = None, lr: float = 0.1, **kwargs):
    torch.manual_seed(0)
    module = DigitsModule(lr=lr)
    start = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(tmp_path, callbacks=list(callbacks), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer, module, start


def _callback(**kwargs) -> GradientDefenseCallback:
    defaults = dict(budget=0.2, k=8, probes=2, refresh_every=100, cold_sweeps=6, seed=3)
    defaults.update(kwargs)
    return GradientDefenseCallback(nn.CrossEntropyLoss(), **defaults)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_fit_protects_every_step_and_logs_risk(loader, tmp_path):
    cb = _callback()
    trainer, _, _ = _fit(loader, [cb], tmp_path=tmp_path, max_steps=4)
    assert trainer.global_step == 4
    assert len(cb.records) == 4 and [r.step for r in cb.records] == [0, 1, 2, 3]
    assert all(not r.fallback and r.relative_energy > 0 for r in cb.records)
    first = cb.records[0]
    assert first.refreshed and len(first.predicted_psnr) == 2
    # the defense lowers the predicted PSNR of the probes below the undefended one
    assert max(first.predicted_psnr) < min(first.undefended_predicted_psnr)
    # the scalars reached Lightning's logger (CSV), one row per step
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    energy = [r["invdefend/gradient/noise/relative_energy"] for r in rows
              if r.get("invdefend/gradient/noise/relative_energy")]
    assert len(energy) == 4
    assert float(energy[0]) == pytest.approx(first.relative_energy, rel=1e-5)
    psnr = [float(r["invdefend/gradient/risk/predicted_psnr_max"]) for r in rows
            if r.get("invdefend/gradient/risk/predicted_psnr_max")]
    assert psnr and psnr[0] == pytest.approx(max(first.predicted_psnr), rel=1e-5)


def test_monitor_run_equals_plain_run_and_noise_changes_parameters(loader):
    _, plain, _ = _fit(loader, [], max_steps=3)
    monitor_cb = _callback(mechanism="monitor")
    _, monitored, _ = _fit(loader, [monitor_cb], max_steps=3)
    spectral_cb = _callback()
    _, defended, _ = _fit(loader, [spectral_cb], max_steps=3)
    assert len(monitor_cb.records) == 3 and all(r.relative_energy == 0 for r in monitor_cb.records)
    assert torch.equal(_flat(plain.parameters()), _flat(monitored.parameters()))
    assert len(spectral_cb.records) == 3
    diff = _flat(defended.parameters()) - _flat(plain.parameters())
    assert diff.norm() > 1e-4 * _flat(plain.parameters()).norm()


class _GradientProbe(pl.Callback):
    """Records the raw gradient at ``on_before_optimizer_step`` (before clipping and before our noise)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(_flat(p.grad for p in pl_module.parameters()))


@pytest.mark.parametrize("placement", ["after_clipping", "before_clipping"])
def test_noise_placement_relative_to_gradient_clipping(loader, placement):
    clip = 0.05
    probe = _GradientProbe()
    cb = _callback(placement=placement, budget=0.5)
    _, module, start = _fit(loader, [probe, cb], lr=1.0, max_steps=1, gradient_clip_val=clip)
    released = _flat(start) - _flat(module.parameters())  # SGD with lr=1: the applied gradient
    g = probe.grads[0]
    assert g.norm() > 2 * clip  # the clip is active
    clipped = g * (clip / g.norm())
    energy = cb.records[0].relative_energy
    assert energy > 0.1
    if placement == "after_clipping":
        # released = clip(g) + δ with ‖δ‖² = relative_energy · ‖clip(g)‖²: the clip did not touch the noise
        noise = released - clipped
        assert noise.pow(2).sum().item() == pytest.approx(energy * clip**2, rel=1e-3)
    else:
        # released = clip(g + δ): norm exactly the clip value, direction off the clean gradient
        assert released.norm().item() == pytest.approx(clip, rel=1e-4)
        cosine = torch.dot(released, clipped) / (released.norm() * clipped.norm())
        assert cosine < 1 - 1e-3


def test_gradient_accumulation_hands_the_full_effective_batch(loader):
    cb = _callback()
    trainer, _, _ = _fit(loader, [cb], max_steps=2, accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert len(cb.records) == 2
    assert cb.last_batch_size == 2 * BATCH


def test_state_round_trip_and_uncovered_parameters_are_refused(loader):
    cb = _callback()
    _fit(loader, [cb], max_steps=2)
    state = cb.state_dict()
    resumed = _callback()
    resumed.load_state_dict(state)
    resumed.setup(None, DigitsModule(), "fit")
    assert resumed.defense.step == 2
    assert torch.equal(resumed.defense.state_dict()["spectrum"]["singular_values"],
                       cb.defense.state_dict()["spectrum"]["singular_values"])

    partial = _callback(module=lambda m: m.net[3])
    with pytest.raises(ValueError, match="outside the defended module"):
        partial.setup(None, DigitsModule(), "fit")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="placement"):
        GradientDefenseCallback(nn.CrossEntropyLoss(), placement="somewhere")
    with pytest.raises(TypeError, match="capture"):
        GradientDefenseCallback(nn.CrossEntropyLoss(), capture=True)
