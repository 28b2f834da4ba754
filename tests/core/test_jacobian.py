"""Matrix-free Jacobian operators against autograd's dense Jacobian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invdefend.jacobian import embedding_jacobian, gradient_jacobian, trainable_parameters


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _reference_gradient_jacobian(model, x, y):
    params = list(model.parameters())

    def flat_grad(xi):
        loss = F.cross_entropy(model(xi.unsqueeze(0)), y.unsqueeze(0))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    return torch.autograd.functional.jacobian(flat_grad, x).reshape(-1, x.numel())


def test_gradient_jacobian_matches_autograd_dense():
    model = _tiny_mlp()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    op = gradient_jacobian(model, F.cross_entropy, x, y)
    J = op.dense()
    assert J.shape == (3, sum(p.numel() for p in model.parameters()), 6)
    for i in range(3):
        ref = _reference_gradient_jacobian(model, x[i], y[i])
        torch.testing.assert_close(J[i], ref, rtol=1e-10, atol=1e-12)


def test_embedding_jacobian_matches_autograd_dense():
    model = _tiny_mlp()
    x = torch.randn(2, 6, dtype=torch.float64)
    op = embedding_jacobian(model, x)
    J = op.dense()
    for i in range(2):
        ref = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).reshape(-1), x[i])
        torch.testing.assert_close(J[i], ref, rtol=1e-10, atol=1e-12)


def test_adjoint_consistency_on_lenet(lenet_case):
    model, loss, x, y = lenet_case
    op = gradient_jacobian(model, loss, x, y)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, op.in_dim, 2, generator=g)
    u = torch.randn(1, op.out_dim, 2, generator=g)
    lhs = (u * op.matvec(v)).sum()
    rhs = (op.rmatvec(u) * v).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-4)
    assert op.values().shape == (1, op.out_dim)


def test_vmap_fallback_for_batchnorm_in_train_mode_is_reported_once_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(2, 1, 6, 6)
    y = torch.tensor([0, 1])
    running = model[1].running_mean.clone()
    op = gradient_jacobian(model, F.cross_entropy, x, y, mode="train")
    v = torch.randn(2, op.in_dim, 3)
    with pytest.warns(RuntimeWarning, match="per-sample loop"):
        batched = op.matvec(v)
    assert op.fallback_reason is not None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        again = op.matvec(v)
    looped = gradient_jacobian(model, F.cross_entropy, x, y, mode="train", vectorize=False).matvec(v)
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(again, looped)
    assert torch.equal(model[1].running_mean, running), "the estimator must not update running statistics"
    assert model.training, "the model's own mode flag is restored"


def test_eval_mode_is_restored_and_used():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.Linear(4, 2))
    model.train()
    x = torch.randn(2, 4)
    op = embedding_jacobian(model, x)  # eval mode: dropout off -> deterministic
    torch.testing.assert_close(op.values(), op.values())
    assert model.training and model[1].training


def test_partially_frozen_model_uses_trainable_parameters_only():
    model = _tiny_mlp()
    model[1].weight.requires_grad_(False)
    op = gradient_jacobian(model, F.cross_entropy, torch.randn(1, 6, dtype=torch.float64), torch.tensor([1]))
    assert op.out_dim == sum(p.numel() for p in trainable_parameters(model).values()) == 5 + 15 + 3


def test_bad_inputs_are_named():
    model = _tiny_mlp()
    with pytest.raises(TypeError, match="embedding_module"):
        gradient_jacobian(model, F.cross_entropy, torch.ones(2, 6, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one target per input"):
        gradient_jacobian(model, F.cross_entropy, torch.randn(2, 6, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        embedding_jacobian(model, torch.full((1, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty batch"):
        embedding_jacobian(model, torch.randn(0, 6, dtype=torch.float64))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        gradient_jacobian(model, F.cross_entropy, torch.randn(1, 6, dtype=torch.float64), torch.tensor([0]))


def test_a_dtype_evaluates_cast_copies_and_leaves_the_model_alone() -> None:
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(2, 5), torch.tensor([0, 2])
    op = gradient_jacobian(model, nn.CrossEntropyLoss(), x, y, dtype=torch.float64)
    assert op.dtype == torch.float64 and op.inputs.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = gradient_jacobian(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), x.double(), y)
    torch.testing.assert_close(op.dense(), reference.dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="floating-point dtype"):
        gradient_jacobian(model, nn.CrossEntropyLoss(), x, y, dtype=torch.int64)
