"""The small models the examples and benchmarks share."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invdefend import GradientDefense
from invdefend.data import load_digits_tensors, natural_image_patches
from invdefend.models import SmallCNN, SmallResNet


def test_small_cnn_shape_and_parameter_count():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) == 1370  # the examples' federated / DDP CNN
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert SmallCNN(in_channels=3, image_size=16, num_classes=4, width=2)(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_small_cnn_refuses_odd_sizes():
    with pytest.raises(ValueError, match="image_size=7"):
        SmallCNN(image_size=7)


# -- SmallResNet ---------------------------------------------------------------------------------------------


def test_small_resnet_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = SmallResNet()
    assert sum(p.numel() for p in model.parameters()) == 42986  # the docstring's figure; well under 1 M
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    digits = SmallResNet(in_channels=1, image_size=8)
    assert digits(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert SmallResNet(in_channels=1, image_size=8, num_classes=3, width=4, blocks=1)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    # two stages: width channels at full resolution, then 2·width at half (stride-2 block, 1x1 projection)
    x = torch.rand(2, 3, 32, 32)
    first = model.stages[0](model.stem(x))
    assert first.shape == (2, 16, 32, 32)
    assert model.stages[1](first).shape == (2, 32, 16, 16)
    down = model.stages[1][0]
    assert isinstance(down.skip, nn.Conv2d) and down.skip.kernel_size == (1, 1) and down.skip.stride == (2, 2)
    assert len(model.stages[0]) == len(model.stages[1]) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_small_resnet_blocks_are_residual():
    torch.manual_seed(0)
    model = SmallResNet(in_channels=1, image_size=8)
    x = torch.rand(3, 1, 8, 8)
    out = model(x)
    block = model.stages[0][1]
    assert isinstance(block.skip, nn.Identity)
    # every block's convolutions are used
    with torch.no_grad():
        block.conv1.weight.add_(0.1)
    assert not torch.allclose(model(x), out)
    # a block whose residual branch is zero passes its (non-negative, post-ReLU) input through unchanged:
    # the model then equals the model without that block, which a plain (non-residual) stack would not
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    pruned = copy.deepcopy(model)
    pruned.stages[0][1] = nn.Identity()
    torch.testing.assert_close(model(x), pruned(x))
    assert not torch.allclose(model(x), out)


def test_small_resnet_refuses_bad_sizes():
    with pytest.raises(ValueError, match="image_size=1"):
        SmallResNet(image_size=1)
    with pytest.raises(ValueError, match="blocks=0"):
        SmallResNet(blocks=0)
    with pytest.raises(ValueError, match="unknown activation"):
        SmallResNet(activation="gelu")


def _defended_steps(model, defense, batches, lr):
    """Run capture → backward → step for each batch; check that every step moved every parameter by
    ``lr · (gradient + the released noise)`` with the recorded noise energy; return the records."""
    optimizer = defense.wrap(torch.optim.SGD(model.parameters(), lr=lr))
    records = []
    for x, y in batches:
        optimizer.zero_grad()
        defense.capture(x, y)
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        optimizer.step()
        rec = defense.last_record
        assert not rec.fallback and rec.mechanism == "spectral"
        for b, p in zip(before, model.parameters()):
            assert not torch.equal(b, p.detach())  # every parameter tensor moved
        update = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())]).double() / lr
        noise = update - grads
        assert rec.relative_energy > 0
        assert float(noise.pow(2).sum() / grads.pow(2).sum()) == pytest.approx(rec.relative_energy, rel=1e-2)
        records.append(rec)
    return records


def test_gradient_defense_trains_small_resnet_at_defaults():
    torch.manual_seed(0)
    model = SmallResNet(image_size=16)  # 16x16 RGB: the cold estimate of 32x32 takes seconds
    x = natural_image_patches(16, size=16, seed=0)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    defense = GradientDefense(model, F.cross_entropy, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fail-closed fallback or a vmap fallback warns
        records = _defended_steps(model, defense, [(x[:8], y[:8]), (x[8:], y[8:]), (x[:8], y[:8])], lr=0.05)
    assert [r.refreshed for r in records] == [True, False, False]
    assert defense.spectrum is not None and defense.spectrum.out_dim == 42986
    # the default placement: half of the budget isotropic (σ²·m = 0.025 per unit ‖ḡ‖²), half water-filled
    assert defense.plan.isotropic * 42986 == pytest.approx(0.025) and records[0].budget == pytest.approx(0.05)


def test_gradient_defense_trains_small_resnet_with_online_prior_and_floor():
    # OnlinePrior() prices with v0·I until it has seen min_samples = 128 released samples, and only a refresh
    # re-estimates: with batches of 64 and a refresh every 2 steps, step 2 is the first whitened estimate.
    x_all, y_all = load_digits_tensors()
    torch.manual_seed(0)
    model = SmallResNet(in_channels=1, image_size=8)
    batches = [(x_all[i * 64 : (i + 1) * 64], y_all[i * 64 : (i + 1) * 64]) for i in range(4)]
    for settings, expect in (
        ({}, ["online (iid until 128 samples)"] * 3),
        ({"refresh_every": 2}, ["online (iid until 128 samples)"] * 2 + ["online"] * 2),
    ):
        defense = GradientDefense(model, F.cross_entropy, seed=0, prior="online", floor=0.05, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            records = _defended_steps(model, defense, batches[: len(expect)], lr=0.05)
        assert [r.risk_prior for r in records] == expect
        assert all(r.budget == pytest.approx(0.10) for r in records)  # budget 0.05 + floor 0.05
        assert defense.plan.isotropic > 0
        assert defense.spectrum.whitened == (expect[-1] == "online")
        defense.detach()
