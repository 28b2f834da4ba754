"""Bad input gets a clear error naming the module, the shape or the parameter, and the fix.

Each case is checked where a user meets it: the estimator (``InvRE`` / the Jacobian operators) and the two
defenses. In a defense, a batch that cannot be assessed at all (empty, non-float, half precision, NaN/Inf)
is refused with :class:`DefenseError` and nothing is released; a layer the Jacobian path cannot handle is a
fail-closed release (conservative noise, warning, record) instead of a crash.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from invdefend import DefenseError, EmbeddingDefense, GradientDefense, InvRE, embedding_jacobian, gradient_jacobian
from invdefend.jacobian import JacobianError
from invdefend.invre import estimate_gradient_spectrum


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()


class _LegacyDouble(torch.autograd.Function):
    """An old-style autograd.Function (no ``setup_context``): torch.func transforms cannot run it."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return 2 * x

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return 2 * g


class LegacyLayer(nn.Module):
    """A layer the Jacobian path cannot differentiate, even one sample at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _LegacyDouble.apply(x)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: vmap cannot batch it, a per-sample loop can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.tanh(x) if bool(x.sum() > -1e9) else x


# -- NaN / Inf ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_inputs_are_refused_by_the_estimator(kit, bad):
    model = kit.make_classifier()
    x, y = kit.make_batch(3)
    x[1, 4] = bad
    with pytest.raises(ValueError, match=r"invdefend\.gradient_jacobian: inputs contain NaN or Inf"):
        InvRE(model, nn.CrossEntropyLoss(), k=2).assess(x, y)
    with pytest.raises(ValueError, match=r"invdefend\.embedding_jacobian: inputs contain NaN or Inf"):
        embedding_jacobian(kit.make_bottom(), x)


def test_nonfinite_gradient_is_refused_and_nothing_is_released_or_stepped(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = kit.make_batch(4)
    _backward(model, x, y, loss)
    model.net[1].weight.grad[0, 0] = math.nan
    grads_before = [p.grad.clone() for p in model.parameters()]
    params_before = copy.deepcopy(model.state_dict())
    with pytest.raises(DefenseError, match=r"GradientDefense: the gradient contains NaN/Inf, nothing was released"):
        opt.step()
    for p, g in zip(model.parameters(), grads_before):
        assert torch.equal(p.grad.nan_to_num(7.0), g.nan_to_num(7.0)), "the gradient was modified"
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), "the optimizer stepped on a refused release"
    assert defense.step == 0 and defense.monitor.history == []


def test_nonfinite_inputs_are_refused_by_both_defenses(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    x, y = kit.make_batch(4)
    _backward(model, x, y, loss)
    defense.capture(torch.full_like(x, math.nan), y)  # e.g. a corrupted copy of the batch
    with pytest.raises(DefenseError, match=r"GradientDefense: .*NaN or Inf.*nothing was released"):
        defense.protect()
    bottom = kit.make_bottom()
    EmbeddingDefense(bottom, k=2).attach()
    x[0, 0] = math.inf
    with pytest.raises(DefenseError, match=r"EmbeddingDefense: .*NaN"):
        bottom(x)


# -- empty batch, batch size 1 --------------------------------------------------------------------------------
def test_empty_batch_is_refused_with_the_shape(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    x, y = kit.make_batch(0)
    with pytest.raises(ValueError, match=r"non-empty batch.*\(0, 12\)"):
        InvRE(model, loss, k=2).assess(x, y)
    with pytest.raises(ValueError, match=r"gradient_jacobian: inputs must be a non-empty batch.*\(0, 12\)"):
        gradient_jacobian(model, loss, x, y)
    defense = GradientDefense(model, loss, k=2)
    defense.capture(x, y)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(DefenseError, match=r"GradientDefense: .*non-empty batch.*\(0, 12\).*nothing was released"):
        defense.protect()
    bottom = kit.make_bottom()
    EmbeddingDefense(bottom, k=2).attach()
    with pytest.raises(DefenseError, match=r"EmbeddingDefense: .*non-empty batch.*\(0, 12\)"):
        bottom(x)


def test_batch_size_one_works_everywhere(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    x, y = kit.make_batch(1)
    report = InvRE(model, loss, k=4).assess(x, y)
    assert report.n_samples == 1 and math.isfinite(report.predicted_psnr[0])

    defense = GradientDefense(model, loss, budget=0.1, k=4)
    _backward(model, x, y, loss)
    clean = kit.flat_grad(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        record = defense.protect()
    assert not record.fallback and record.mechanism == "spectral"
    assert record.budget == pytest.approx(0.1, rel=1e-6)
    assert not torch.equal(kit.flat_grad(model), clean)

    bottom = kit.make_bottom()
    emb = EmbeddingDefense(bottom, budget=0.1).attach()
    h = bottom(x)
    assert h.shape == (1, kit.EMB) and not emb.last_record.fallback


# -- integer inputs (token ids) -------------------------------------------------------------------------------
def test_integer_inputs_point_to_the_embedding_layer_output():
    tokens = torch.randint(0, 10, (3, 5))
    labels = torch.tensor([0, 1, 0])
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    with pytest.raises(TypeError, match=r"gradient_jacobian: inputs have dtype torch\.int64.*embedding_module"):
        InvRE(model, nn.CrossEntropyLoss(), k=2).assess(tokens, labels)
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    loss(model(tokens), labels).backward()
    token_advice = r"inputs have dtype torch\.int64.*embedding_module"
    with pytest.raises(DefenseError, match=r"GradientDefense: " + token_advice):
        defense.protect()
    bottom = nn.Sequential(nn.Embedding(10, 4), nn.Flatten())
    EmbeddingDefense(bottom, k=2).attach()
    with pytest.raises(DefenseError, match=r"EmbeddingDefense: " + token_advice):
        bottom(tokens)


def test_the_suggested_fix_for_token_ids_works():
    """Name the embedding module: the Jacobian is taken with respect to its output, table included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    tokens, labels = torch.randint(0, 10, (3, 5)), torch.tensor([0, 1, 0])
    spec = estimate_gradient_spectrum(model, nn.CrossEntropyLoss(), tokens, labels, k=2, embedding_module="0")
    assert spec.in_dim == 20 and spec.out_dim == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(spec.singular_values).all() and (spec.singular_values > 0).all()


# -- frozen parameters ----------------------------------------------------------------------------------------
def test_all_frozen_is_refused_at_construction(kit):
    model = kit.make_classifier().requires_grad_(False)
    x, y = kit.make_batch(2)
    with pytest.raises(ValueError, match=r"MLP has no parameter with requires_grad=True.*unfreeze"):
        InvRE(model, nn.CrossEntropyLoss(), k=2).assess(x, y)
    with pytest.raises(ValueError, match=r"MLP has no parameter with requires_grad=True.*unfreeze"):
        GradientDefense(model, nn.CrossEntropyLoss())


def test_partially_frozen_uses_the_trainable_parameters_only(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    model.net[1].requires_grad_(False)  # freeze the first layer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, y = kit.make_batch(3)
    assert gradient_jacobian(model, loss, x, y).out_dim == trainable
    defense = GradientDefense(model, loss, budget=0.1, k=4)
    _backward(model, x, y, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        record = defense.protect()
    assert not record.fallback
    assert model.net[1].weight.grad is None, "noise was written onto a frozen parameter"
    assert model.net[3].weight.grad is not None


def test_unfreezing_a_layer_mid_training_re_estimates_at_once(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    model.net[1].requires_grad_(False)
    defense = GradientDefense(model, loss, budget=0.1, k=4, refresh_every=100)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    refreshed = []
    for step in range(4):
        if step == 2:
            model.net[1].requires_grad_(True)  # e.g. a fine-tuning schedule unfreezes the first layer
        x, y = kit.make_batch(4, seed=step)
        opt.zero_grad()
        loss(model(x), y).backward()
        clean = kit.flat_grad(model)
        opt.step()
        assert not defense.last_record.fallback and not torch.equal(kit.flat_grad(model), clean)
        refreshed.append(defense.last_record.refreshed)
    assert refreshed == [True, False, True, False]


# -- layers the Jacobian path cannot handle ---------------------------------------------------------------------
def test_batchnorm_in_train_mode_names_the_layer_and_suggests_eval(kit):
    model = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = kit.make_batch(4)
    with pytest.raises(JacobianError, match=r"in layer '1' \(BatchNorm1d\).*mode='eval'"):
        gradient_jacobian(model, nn.CrossEntropyLoss(), x, y, mode="train")
    gradient_jacobian(model, nn.CrossEntropyLoss(), x, y, mode="eval")  # the suggested fix works


def test_layer_without_transform_support_names_the_layer(kit):
    model = nn.Sequential(nn.Linear(12, 6), LegacyLayer(), nn.Linear(6, 3))
    x, y = kit.make_batch(3)
    with pytest.raises(JacobianError, match=r"in layer '1' \(LegacyLayer\).*target='embedding'"):
        InvRE(model, nn.CrossEntropyLoss(), k=2).assess(x, y)
    op = embedding_jacobian(model, x)  # a plain forward works; the first product cannot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the vmap -> loop fallback notice
        with pytest.raises(JacobianError, match=r"embedding_jacobian: .*LegacyLayer"):
            op.matvec(torch.ones(3, 12, 1))


def test_vmap_fallback_warns_once_and_gives_the_same_jacobian(kit):
    branchy = nn.Sequential(nn.Linear(12, 6), DataDependent(), nn.Linear(6, 3))
    plain = nn.Sequential(branchy[0], nn.Tanh(), branchy[2])
    x, y = kit.make_batch(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = gradient_jacobian(branchy, nn.CrossEntropyLoss(), x, y)
        J = op.dense()
    notices = [w for w in caught if "cannot batch this model" in str(w.message)]
    assert len(notices) == 1 and issubclass(notices[0].category, RuntimeWarning)
    assert op.fallback_reason and "vmap" in op.fallback_reason
    ref = gradient_jacobian(plain, nn.CrossEntropyLoss(), x, y).dense()
    torch.testing.assert_close(J, ref, rtol=1e-5, atol=1e-6)


def test_unsupported_layer_inside_a_defense_is_a_fail_closed_release(kit):
    model = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.05, fallback_budget=0.5, k=2, mode="train")
    x, y = kit.make_batch(8)
    _backward(model, x, y, loss)
    clean = kit.flat_grad(model)
    with pytest.warns(RuntimeWarning, match=r"estimation failed .*BatchNorm1d.*conservative isotropic noise"):
        record = defense.protect()
    released = kit.flat_grad(model)
    assert record.fallback and record.mechanism == "fallback" and "BatchNorm1d" in record.fallback_reason
    ratio = float((released - clean).pow(2).sum() / clean.pow(2).sum())
    assert 0.2 < ratio / 0.5 < 3.0, ratio


# -- mismatched shapes and dtypes ---------------------------------------------------------------------------------
def test_inputs_not_matching_the_model_name_the_layer_and_shape(kit):
    model = kit.make_classifier()
    x, y = torch.rand(3, 11), torch.tensor([0, 1, 2])
    with pytest.raises(JacobianError, match=r"in layer 'net\.1' \(Linear\) \(sample shape \(11,\)"):
        InvRE(model, nn.CrossEntropyLoss(), k=2).assess(x, y)


def test_input_and_target_counts_must_match(kit):
    model = kit.make_classifier()
    x, y = kit.make_batch(4)
    with pytest.raises(ValueError, match=r"gradient_jacobian: 4 inputs but 3 targets; pass one target per input"):
        gradient_jacobian(model, nn.CrossEntropyLoss(), x, y[:3])
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, k=2)
    _backward(model, x, y, loss)
    defense.capture(x, y[:3])
    with pytest.raises(DefenseError, match=r"captured 4 inputs but 3 targets"):
        defense.protect()


def test_targets_the_loss_rejects_are_reported_with_the_target_shape(kit):
    model = kit.make_classifier()
    x, _ = kit.make_batch(2)
    with pytest.raises(JacobianError, match=r"in the loss.*target shape \(\)\): IndexError: Target 7 is out of bounds"):
        gradient_jacobian(model, nn.CrossEntropyLoss(), x, torch.tensor([7, 0]))  # label 7 of 3 classes


def test_model_and_input_dtypes_must_match(kit):
    x, y = kit.make_batch(2)
    pattern = r"inputs are torch\.float32 but MLP's parameters are torch\.float64.*inputs\.to"
    with pytest.raises(TypeError, match=pattern):
        gradient_jacobian(kit.make_classifier(dtype=torch.float64), nn.CrossEntropyLoss(), x, y)


# -- parameters -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, -0.1, math.nan, math.inf, True, "0.1"])
def test_invalid_budget_names_the_parameter(kit, budget):
    with pytest.raises(ValueError, match=r"GradientDefense: budget=.* must be a finite noise energy > 0"):
        GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), budget=budget)
    with pytest.raises(ValueError, match=r"EmbeddingDefense: budget=.* must be a finite noise energy > 0"):
        EmbeddingDefense(kit.make_bottom(), budget=budget)


def test_invalid_fallback_budget_names_the_parameter(kit):
    with pytest.raises(ValueError, match=r"fallback_budget=0"):
        GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), fallback_budget=0)
    with pytest.raises(ValueError, match=r"fallback_budget=-1"):
        EmbeddingDefense(kit.make_bottom(), fallback_budget=-1)


@pytest.mark.parametrize("target", [-5.0, 0.0, 10.0, math.nan])
def test_target_psnr_outside_range_is_refused(kit, target):
    pattern = r"target_psnr=nan must be a finite" if math.isnan(target) else r"target_psnr=.* dB is out of range"
    with pytest.raises(ValueError, match=pattern):
        GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), target_psnr=target)
    with pytest.raises(ValueError, match=pattern):
        EmbeddingDefense(kit.make_bottom(), target_psnr=target)


def test_invalid_mode_names_the_parameter(kit):
    x, y = kit.make_batch(2)
    with pytest.raises(ValueError, match=r"gradient_jacobian: mode='training'; choose 'eval'"):
        gradient_jacobian(kit.make_classifier(), nn.CrossEntropyLoss(), x, y, mode="training")
    with pytest.raises(ValueError, match=r"embedding_jacobian: mode='Eval'"):
        embedding_jacobian(kit.make_bottom(), x, mode="Eval")
    with pytest.raises(ValueError, match=r"GradientDefense: mode='training'"):
        GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), mode="training")


def test_missing_capture_is_refused(kit):
    model = kit.make_classifier()
    defense = GradientDefense(model, lambda out, t: nn.functional.cross_entropy(out, t), k=2)
    x, y = kit.make_batch(2)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(DefenseError, match=r"no \(inputs, targets\) captured.*defense\.capture"):
        defense.protect()
