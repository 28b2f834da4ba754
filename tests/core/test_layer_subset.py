"""A layer subset: the Jacobian of chosen parameters' gradient, and the bound on what the rest adds (THEORY §10.6)."""

import json

import pytest
import torch
import torch.nn.functional as F

from invdefend import InvRE, NoiseModel
from invdefend.cli import main
from invdefend.data import load_digits_tensors
from invdefend.jacobian import gradient_jacobian, select_parameters
from invdefend.models import MLP, LeNet
from invdefend.prior import GaussianPrior
from invdefend.risk import invloss, predicted_psnr
from invdefend.spectral import estimate_spectrum, exact_spectrum
from invdefend.subset import (
    RestBound,
    bounded_invloss,
    lanczos_factor,
    rest_norm,
    rest_parameters,
)
from invdefend.whitened import WhitenedOperator

LENET_SUBSET = ["features.4", "classifier"]
MLP_SUBSET = ["net.3"]  # the classifier of a two-hidden-layer MLP


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_tensors(torch.float64)
    return x[:3], y[:3], x[100:400]


def _lenet():
    torch.manual_seed(0)
    return LeNet(in_channels=1, image_size=8, width=4).double()


def _mlp():
    torch.manual_seed(1)
    return MLP(64, hidden=(24, 16), out_features=10, activation="tanh").double()


CASES = [(_lenet, LENET_SUBSET), (_mlp, MLP_SUBSET)]


def _rows(model, chosen):
    """Row indices of the chosen and of the other parameters in the whole gradient."""
    rows, start = {True: [], False: []}, 0
    for name, p in model.named_parameters():
        rows[name in chosen] += range(start, start + p.numel())
        start += p.numel()
    return rows[True], rows[False]


@pytest.mark.parametrize("make, subset", CASES)
def test_subset_operator_is_the_chosen_rows_of_the_whole_jacobian(digits, make, subset):
    x, y, _ = digits
    model = make()
    whole = gradient_jacobian(model, F.cross_entropy, x, y).dense()
    part = gradient_jacobian(model, F.cross_entropy, x, y, params=subset).dense()
    chosen, _ = _rows(model, select_parameters(model, subset))
    torch.testing.assert_close(part, whole[:, chosen], rtol=1e-12, atol=1e-14)


def test_default_path_is_unchanged(digits):
    x, y, _ = digits
    model = _lenet()
    everything = [name for name, _ in model.named_parameters()]
    default = gradient_jacobian(model, F.cross_entropy, x, y).dense()
    assert torch.equal(default, gradient_jacobian(model, F.cross_entropy, x, y, params=everything).dense())


@pytest.mark.parametrize("make, subset", CASES)
def test_rest_norm_is_an_upper_estimate_within_its_factor(digits, make, subset):
    x, y, _ = digits
    model = make()
    whole = gradient_jacobian(model, F.cross_entropy, x, y).dense()
    _, rest_rows = _rows(model, select_parameters(model, subset))
    exact = torch.linalg.matrix_norm(whole[:, rest_rows], ord=2)
    for steps in (8, 12):  # a Krylov space smaller than the 64 input coordinates: the factor is > 1
        bound = rest_norm(model, F.cross_entropy, x, y, subset, steps=steps)
        assert bound.factor == pytest.approx(lanczos_factor(64, steps)) and bound.factor > 1.05
        assert torch.all(bound.norm >= exact) and torch.all(bound.norm <= bound.factor * exact * (1 + 1e-9))
        assert torch.all(bound.ritz <= exact * (1 + 1e-9))
        assert bound.out_dim == len(rest_rows)
        torch.testing.assert_close(bound.signal_norm, gradient_jacobian(
            model, F.cross_entropy, x, y, params=rest_parameters(model, subset)).values().norm(dim=-1))


def test_lanczos_factor_shrinks_with_steps_and_refuses_too_few():
    factors = [lanczos_factor(3072, steps) for steps in (8, 16, 24, 48)]
    assert factors == sorted(factors, reverse=True) and factors[-1] < 1.02
    assert lanczos_factor(64, 64) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="at least"):
        lanczos_factor(3072, 4)


@pytest.mark.parametrize("make, subset", CASES)
def test_bound_is_conservative_and_the_subset_alone_is_not(digits, make, subset):
    x, y, _ = digits
    model = make()
    whole = exact_spectrum(gradient_jacobian(model, F.cross_entropy, x, y))
    part = exact_spectrum(gradient_jacobian(model, F.cross_entropy, x, y, params=subset))
    bound = rest_norm(model, F.cross_entropy, x, y, subset)
    nothing = RestBound(torch.zeros(3), torch.zeros(3), bound.signal_norm, bound.out_dim, 1.0, 0, bound.failure)
    optimistic_somewhere = False
    for iso in (0.0, 1e-9, 1e-7, 1e-5, 1e-3):
        noise = NoiseModel(isotropic=iso)
        truth = predicted_psnr(invloss(whole, noise))
        bounded = predicted_psnr(bounded_invloss(part, bound, noise))
        alone = predicted_psnr(bounded_invloss(part, nothing, noise))
        assert torch.all(bounded >= truth - 1e-9), (iso, bounded, truth)
        assert torch.all(alone <= truth + 1e-9), (iso, alone, truth)
        optimistic_somewhere |= bool((truth - alone > 1.0).any())
    assert optimistic_somewhere  # the subset alone under-states the risk by over 1 dB: why the bound is needed


def test_bound_with_top_k_and_its_tail_stays_conservative(digits):
    x, y, _ = digits
    model = _lenet()
    whole = exact_spectrum(gradient_jacobian(model, F.cross_entropy, x, y))
    part = estimate_spectrum(gradient_jacobian(model, F.cross_entropy, x, y, params=LENET_SUBSET), 8,
                             method="subspace", tol=1e-6, max_sweeps=30)
    bound = rest_norm(model, F.cross_entropy, x, y, LENET_SUBSET)
    for iso in (0.0, 1e-7, 1e-5):
        noise = NoiseModel(isotropic=iso)
        truth = predicted_psnr(invloss(whole, noise))
        assert torch.all(predicted_psnr(bounded_invloss(part, bound, noise, tail="topk")) >= truth - 1e-6)


def test_bound_under_a_data_prior_is_conservative(digits):
    x, y, calibration = digits
    model = _lenet()
    prior = GaussianPrior.fit(calibration.float(), 16).to(torch.float64)
    op = gradient_jacobian(model, F.cross_entropy, x, y)
    whole = estimate_spectrum(op, 64, method="exact", prior=prior)
    part = estimate_spectrum(gradient_jacobian(model, F.cross_entropy, x, y, params=LENET_SUBSET), 64,
                             method="exact", prior=prior)
    bound = rest_norm(model, F.cross_entropy, x, y, LENET_SUBSET, prior=prior)
    _, rest_rows = _rows(model, select_parameters(model, LENET_SUBSET))
    exact = torch.linalg.matrix_norm(WhitenedOperator(op, prior).dense()[:, rest_rows], ord=2)
    assert bound.whitened and torch.all(bound.norm >= exact)
    for iso in (0.0, 1e-7, 1e-5):
        noise = NoiseModel(isotropic=iso)
        assert torch.all(predicted_psnr(bounded_invloss(part, bound, noise)) >=
                         predicted_psnr(invloss(whole, noise)) - 1e-9)
    with pytest.raises(ValueError, match="both"):  # a whitened spectrum with an unwhitened bound
        bounded_invloss(part, rest_norm(model, F.cross_entropy, x, y, LENET_SUBSET))


def test_subset_of_every_parameter_needs_no_bound(digits):
    x, y, _ = digits
    model = _mlp()
    everything = [name for name, _ in model.named_parameters()]
    bound = rest_norm(model, F.cross_entropy, x, y, everything)
    assert bound.out_dim == 0 and torch.all(bound.norm == 0)
    whole = exact_spectrum(gradient_jacobian(model, F.cross_entropy, x, y))
    torch.testing.assert_close(bounded_invloss(whole, bound), invloss(whole))


def test_parameters_chosen_by_name_module_name_or_module():
    model = _lenet()
    by_module = select_parameters(model, [model.classifier, "features.4"])
    assert by_module == ["features.4.weight", "features.4.bias", "classifier.weight", "classifier.bias"]
    assert select_parameters(model, "classifier.bias") == ["classifier.bias"]
    assert rest_parameters(model, by_module) == ["features.0.weight", "features.0.bias", "features.2.weight",
                                                 "features.2.bias"]


def test_bad_choices_are_refused_clearly(digits):
    x, y, _ = digits
    model = _lenet()
    with pytest.raises(ValueError, match="'nope', 'features.9'.*top-level modules are"):
        gradient_jacobian(model, F.cross_entropy, x, y, params=["nope", "classifier", "features.9"])
    with pytest.raises(ValueError, match="chooses nothing"):
        gradient_jacobian(model, F.cross_entropy, x, y, params=[])
    with pytest.raises(ValueError, match="not a submodule"):
        select_parameters(model, [torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="names"):
        select_parameters(model, [3])
    model.classifier.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen parameters \['classifier.bias'\]"):
        select_parameters(model, ["classifier.bias"])
    assert select_parameters(model, ["classifier"]) == ["classifier.weight"]  # a module: its trainable ones
    model.classifier.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        select_parameters(model, ["classifier"])
    with pytest.raises(ValueError, match="embedding"):
        InvRE(_lenet(), target="embedding", params=["classifier"])
    with pytest.raises(ValueError, match="rest_steps"):
        InvRE(_lenet(), F.cross_entropy, params=["classifier"], rest_steps=1)


def test_invre_with_a_subset_end_to_end(digits):
    x, y, _ = digits
    model = _lenet().float()
    x32, y32 = x.float(), y
    default = InvRE(model, F.cross_entropy, k=8, prior="iid", batch_size=2)
    before = default.assess(x32, y32)
    assert "params" not in before.settings and "rest_bound" not in before.settings
    subset = InvRE(model, F.cross_entropy, k=8, prior="iid", batch_size=2, params=LENET_SUBSET)
    report = subset.assess(x32, y32)
    settings = report.settings
    assert settings["params"] == LENET_SUBSET and len(settings["rest_bound"]) == 3  # merged over two chunks
    assert settings["out_dim"] == before.settings["out_dim"] > settings["subset_out_dim"]
    assert settings["rest_rule"]["factor"] >= 1.0 and all(b > 0 for b in settings["rest_bound"])
    json.dumps(report.to_dict())
    # the subset's bound is at least the whole model's risk, up to the estimators' accuracy (top-8 + SLQ)
    assert min(b - a for a, b in zip(before.predicted_psnr, report.predicted_psnr)) > -0.5
    again = InvRE(model, F.cross_entropy, k=8, prior="iid", batch_size=2).assess(x32, y32)
    assert again.predicted_psnr == before.predicted_psnr  # the default is deterministic and unchanged


def test_assess_cli_takes_params(tmp_path, capsys):
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[2] / "examples" / "model_zoo.py"
    out = tmp_path / "r.json"
    args = ["assess", "--model", f"{zoo}:lenet_digits", "--data", "digits", "-n", "2", "-k", "4", "--prior", "iid",
            "--out", str(out)]
    assert main([*args, "--params", "nope,also_nope"]) == 2
    assert "'nope', 'also_nope'" in capsys.readouterr().err
    assert main([*args, "--params", " , "]) == 2
    assert "names nothing" in capsys.readouterr().err
    assert main([*args, "--params", "classifier", "--target", "embedding"]) == 2
    assert "--target embedding" in capsys.readouterr().err
    last = [name for name, _ in _model_from(zoo).named_children()][-1]
    assert main([*args, "--params", last]) == 0
    assert "layer subset" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["params"] == [last] and len(report["settings"]["rest_bound"]) == 2


def _model_from(zoo):
    from invdefend.commands.assess import build_model

    return build_model(f"{zoo}:lenet_digits")
