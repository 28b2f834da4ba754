"""TensorBoard beyond scalars: probe reconstructions as images, the settings as hparams in the same run.

Train a few steps of a tiny CNN on 8x8 digits, read the event files back and check what a user opens in
TensorBoard: the probe image at every refresh, its scalars, the hparams session, the spectrum histogram and the
cumulative risk. The diagnostic must not perturb training (bit-identical releases) nor break a step when it fails.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

import invdefend.probe_reconstruction as probe_module
from invdefend.data import digits_split
from invdefend.defense import EmbeddingDefense, GradientDefense
from invdefend.models import MLP, TextTransformer
from invdefend.monitor import RiskMonitor, probe_image

G = "invdefend/gradient/"
STEPS, REFRESH_EVERY, ITERATIONS = 5, 2, 20
REFRESHES = [0, 2, 4]


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def train(monitor: RiskMonitor | None, steps: int = STEPS, **settings) -> tuple[GradientDefense, list[torch.Tensor]]:
    """Train ``steps`` SGD steps under a defense; returns it and the released (noised) flat gradients."""
    x_train, y_train, _, _ = digits_split(seed=0)
    torch.manual_seed(0)
    model = tiny_cnn()
    criterion = nn.CrossEntropyLoss()
    defense = GradientDefense(model, criterion, budget=0.05, k=8, refresh_every=REFRESH_EVERY, seed=0,
                              releases_per_sample=2, monitor=monitor, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    released = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (16,), generator=gen)
        optimizer.zero_grad()
        criterion(model(x_train[idx]), y_train[idx]).backward()
        defense.protect()
        released.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        optimizer.step()
    return defense, released


def events(log_dir) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.IMAGES: 0, ea.SCALARS: 0, ea.HISTOGRAMS: 0,
                                                            ea.TENSORS: 0})
    return acc.Reload()


def test_probe_images_hparams_histogram_and_cumulative_risk_in_one_run(tmp_path) -> None:
    monitor = RiskMonitor(log_dir=str(tmp_path))
    defense, _ = train(monitor, reconstruct_probe=ITERATIONS)
    monitor.close()
    acc = events(tmp_path)
    tags = acc.Tags()
    images = acc.Images(G + "probe/reconstruction")
    assert [im.step for im in images] == REFRESHES
    png = Image.open(io.BytesIO(images[0].encoded_image_string))
    # 8x8 digit | 1-pixel separator | 8x8 reconstruction, upscaled 8x by nearest neighbour.
    assert png.size == ((8 + 1 + 8) * 8, 8 * 8) == (images[0].width, images[0].height)
    pixels = torch.tensor(list(png.convert("L").getdata()), dtype=torch.float32).reshape(64, 136)
    assert bool((pixels[:, 64:72] == 255).all())  # the white separator
    for name in ("attack_psnr", "attack_ssim", "attack_seconds"):
        assert [s.step for s in acc.Scalars(G + "probe/" + name)] == REFRESHES, name
    psnrs = [s.value for s in acc.Scalars(G + "probe/attack_psnr")]
    extras = [r.extra["probe_attack"] for r in monitor.history if "probe_attack" in r.extra]
    assert [r.step for r in monitor.history if "probe_attack" in r.extra] == REFRESHES
    assert psnrs == pytest.approx([e["psnr"] for e in extras], rel=1e-5)
    assert all(e["attack"] == "defense_aware_gradient" and e["seconds"] > 0 for e in extras)
    assert all(-1.0 <= s.value <= 1.0 for s in acc.Scalars(G + "probe/attack_ssim"))
    # The hparams session lives in this run: no sub-run directory, one event file.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["budget"].number_value == pytest.approx(0.05)
    assert hp["refresh_every"].number_value == REFRESH_EVERY
    assert hp["reconstruct_probe"].number_value == ITERATIONS
    assert hp["mechanism"].string_value == "spectral" and hp["prior"].string_value == "online"
    assert hp["floor"].number_value == pytest.approx(0.025)  # floor=None resolved: half the budget
    assert defense.hparams()["seed"] == 0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert G + "risk/predicted_psnr_max" in metrics and G + "probe/attack_psnr" in metrics
    assert metrics <= set(tags["scalars"])  # every declared metric is a scalar of the run
    # The spectrum histogram and the cumulative risk are still there.
    assert [h.step for h in acc.Histograms(G + "spectrum/log10_singular_values")] == REFRESHES
    assert G + "risk/cumulative_predicted_psnr_max" in tags["scalars"]


def test_off_by_default_and_the_diagnostic_does_not_perturb_training(tmp_path) -> None:
    monitor = RiskMonitor(log_dir=str(tmp_path / "off"))
    off, released_off = train(monitor)
    monitor.close()
    rng_off = torch.random.get_rng_state()
    assert off.reconstruct_probe == 0
    assert events(tmp_path / "off").Tags()["images"] == []
    assert not any("probe_attack" in r.extra for r in monitor.history)
    on_monitor = RiskMonitor(log_dir=str(tmp_path / "on"))
    on, released_on = train(on_monitor, reconstruct_probe=ITERATIONS)
    on_monitor.close()
    assert len(events(tmp_path / "on").Images(G + "probe/reconstruction")) == len(REFRESHES)
    assert all(torch.equal(a, b) for a, b in zip(released_off, released_on, strict=True))
    assert torch.equal(torch.random.get_rng_state(), rng_off)  # the global RNG was not drawn from
    assert [r.predicted_psnr for r in monitor.history] == [r.predicted_psnr for r in on_monitor.history]
    assert all(torch.equal(a, b) for a, b in zip(off.model.parameters(), on.model.parameters(), strict=True))
    assert all(p.grad is not None for p in on.model.parameters())  # the user's .grad kept the release


def test_a_failing_probe_attack_warns_and_the_step_still_releases_noise(tmp_path, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("attack blew up")

    monkeypatch.setattr(probe_module, "defense_aware_gradient_attack", broken)
    monitor = RiskMonitor(log_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="invdefend"):
        defense, released = train(monitor, steps=1, reconstruct_probe=ITERATIONS)
    monitor.close()
    assert "probe reconstruction failed (RuntimeError: attack blew up)" in caplog.text
    record = defense.last_record
    assert record is not None and record.refreshed and not record.fallback
    assert record.relative_energy > 0 and "probe_attack" not in record.extra
    assert torch.isfinite(released[0]).all()
    tags = events(tmp_path).Tags()
    assert tags["images"] == [] and G + "noise/relative_energy" in tags["scalars"]


@pytest.mark.parametrize("value", [-1, 2.5, True, "40"])
def test_reconstruct_probe_is_validated(value) -> None:
    with pytest.raises(ValueError, match="reconstruct_probe"):
        GradientDefense(tiny_cnn(), nn.CrossEntropyLoss(), reconstruct_probe=value)


def test_reconstruct_probe_is_refused_where_there_is_no_probe_to_reconstruct() -> None:
    with pytest.raises(ValueError, match="GradientDefense diagnostic"):
        EmbeddingDefense(MLP(in_features=8, hidden=(4,), out_features=4), reconstruct_probe=5)
    text = TextTransformer(vocab=20, seq_len=4, dim=8, depth=1, heads=2, mlp=8)
    with pytest.raises(ValueError, match="token ids"):
        GradientDefense(text, nn.CrossEntropyLoss(), embedding_module="embed", reconstruct_probe=5)


def test_probe_image_lays_samples_side_by_side_upscaled() -> None:
    rgb = probe_image(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    assert rgb.shape == (3, 64, 130) and 0.0 <= float(rgb.min()) and float(rgb.max()) <= 1.0
    flat = probe_image(torch.full((10,), 2.0), torch.zeros(10))  # a vector on the smallest square, clipped
    assert flat.shape == (1, 64, 144) and float(flat.max()) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        probe_image(torch.rand(1, 8, 8), torch.rand(1, 4, 4))


def test_hparams_can_be_left_to_a_framework_that_writes_its_own(tmp_path) -> None:
    """A writer shared with e.g. Lightning's logger holds one hparams session: RiskMonitor(hparams=False)
    leaves it to the framework, and everything else is still written."""
    monitor = RiskMonitor(log_dir=str(tmp_path), hparams=False)
    train(monitor, steps=2)
    monitor.close()
    assert monitor.write_hparams("gradient", {"budget": 0.05}, ["risk/predicted_psnr_max"]) is False
    acc = events(tmp_path)
    with pytest.raises(KeyError):  # no hparams plugin data in the run at all
        acc.PluginTagToContent("hparams")
    assert G + "noise/relative_energy" in acc.Tags()["scalars"]
