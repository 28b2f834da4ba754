"""InvRE over batches, loaders, checkpoints; its JSON report."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from invdefend import InvRE, NoiseModel, RiskReport, format_comparison
from invdefend.data import load_digits_tensors
from invdefend.models import LeNet, MLP


@pytest.fixture(scope="module")
def digits_batch():
    x, y = load_digits_tensors()
    return x[:6], y[:6]


def _lenet():
    torch.manual_seed(0)
    return LeNet(in_channels=1, image_size=8, activation="relu")


def test_assess_reports_per_sample_risk_and_aggregates(digits_batch, tmp_path):
    x, y = digits_batch
    report = InvRE(_lenet(), F.cross_entropy, k=8, batch_size=4).assess(x, y, name="lenet")
    assert report.n_samples == 6
    assert len(report.singular_values) == 6 and len(report.singular_values[0]) == 8
    agg = report.aggregates
    assert agg["predicted_psnr"]["max"] >= agg["predicted_psnr"]["p95"] >= agg["predicted_psnr"]["mean"]
    assert all(0.0 <= v <= 1.0 for v in report.leakage)
    assert report.estimator["converged_fraction"] == 1.0 and report.estimator["tail"] == "slq"
    path = report.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["n_samples"] == 6 and data["settings"]["target"] == "gradient"
    again = RiskReport.from_dict(data)
    assert again.predicted_psnr == report.predicted_psnr
    assert "lenet" in report.table()


def test_noise_lowers_reported_risk(digits_batch):
    x, y = digits_batch
    model = _lenet()
    clean = InvRE(model, F.cross_entropy, k=8, tail="topk").assess(x, y)
    noisy = InvRE(model, F.cross_entropy, k=8, tail="topk", noise=NoiseModel(isotropic=1e-3)).assess(x, y)
    assert all(a > b for a, b in zip(clean.predicted_psnr, noisy.predicted_psnr))


def test_assess_loader_and_max_samples(digits_batch):
    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=4)
    report = InvRE(_lenet(), F.cross_entropy, k=4, tail="topk").assess_loader(loader, max_samples=7)
    assert report.n_samples == 7


def test_compare_checkpoints_sees_training_change_the_risk(digits_batch):
    x, y = digits_batch
    init = _lenet()
    trained = _lenet()
    xs, ys = load_digits_tensors()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(trained(xs[:256]), ys[:256]).backward()
        opt.step()
    estimator = InvRE(init, F.cross_entropy, k=8, tail="topk")
    reports = estimator.compare({"init": init, "trained": trained}, x, y)
    assert set(reports) == {"init", "trained"}
    assert reports["init"].singular_values != reports["trained"].singular_values
    assert estimator.model is init
    table = format_comparison(reports)
    assert "init" in table and "trained" in table


def test_embedding_target_and_exact_method_agree(digits_batch):
    x, _ = digits_batch
    torch.manual_seed(0)
    bottom = MLP(64, (32,), 24, final_activation=True)
    sub = InvRE(bottom, target="embedding", k=8).assess(x)
    exact = InvRE(bottom, target="embedding", k=8, method="exact").assess(x)
    for a, b in zip(sub.singular_values, exact.singular_values):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-2, atol=1e-6)


def test_invre_argument_errors():
    model = _lenet()
    with pytest.raises(ValueError, match="loss_fn"):
        InvRE(model)
    with pytest.raises(ValueError, match="target"):
        InvRE(model, F.cross_entropy, target="weights")
    with pytest.raises(ValueError, match="targets"):
        InvRE(model, F.cross_entropy).assess(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="non-empty"):
        InvRE(model, F.cross_entropy).assess(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
