"""The Jacobian path on the layers real models use: token ids through an embedding module (with a stock
``nn.TransformerEncoder``, whose fused attention kernel has no forward-mode derivative), BatchNorm as
trained (batch statistics, the rest of the batch held fixed), GroupNorm, LayerNorm and Dropout. Every
operator is checked against central finite differences of the quantity it claims to differentiate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from invdefend.jacobian import (
    batch_gradient_jacobian,
    batch_statistics,
    gradient_jacobian,
)
from invdefend.models import TextTransformer

V, T, D, C = 30, 5, 8, 3


def token_classifier() -> nn.Module:
    """Token ids -> embedding + learned positions -> stock TransformerEncoder (1 layer) -> mean pool -> classes."""
    return TextTransformer(vocab=V, seq_len=T, num_classes=C, dim=D, depth=1, heads=2, mlp=16, dropout=0.1)


def _flat_grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def test_token_path_value_is_the_whole_per_sample_gradient_table_included():
    torch.manual_seed(0)
    model, loss = token_classifier().double(), nn.CrossEntropyLoss()
    model.eval()
    ids, y = torch.randint(0, V, (3, T)), torch.tensor([0, 2, 1])
    op = gradient_jacobian(model, loss, ids, y, embedding_module="embed")
    assert op.in_dim == T * D and op.out_dim == sum(p.numel() for p in model.parameters())
    values = op.values()
    for i in range(3):
        model.zero_grad()
        loss(model(ids[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(values[i], _flat_grads(model), rtol=1e-10, atol=1e-12)
        assert int((model.embed.weight.grad.abs().sum(1) > 0).sum()) == ids[i].unique().numel()


def test_token_path_jacobian_matches_finite_differences_through_stock_attention():
    """The default SDPA kernel has no forward AD; the estimator selects the math kernel itself."""
    torch.manual_seed(1)
    model, loss = token_classifier().double(), nn.CrossEntropyLoss()
    ids, y = torch.randint(0, V, (2, T)), torch.tensor([1, 0])
    op = gradient_jacobian(model, loss, ids, y, embedding_module=model.embed)
    emb = op.inputs
    v = torch.randn(2, T * D, 1, dtype=torch.float64)
    jv = op.matvec(v)
    assert op.fallback_reason is None, op.fallback_reason
    eps = 1e-6

    def grad_at(i: int, e: Tensor) -> Tensor:
        m = copy.deepcopy(model).eval()
        handle = m.embed.register_forward_hook(lambda mod, a, out: out - out.detach() + e.unsqueeze(0))
        m.zero_grad()
        loss(m(ids[i : i + 1]), y[i : i + 1]).backward()
        handle.remove()
        return _flat_grads(m)

    for i in range(2):
        step = eps * v[i, :, 0].reshape(T, D)
        fd = (grad_at(i, emb[i] + step) - grad_at(i, emb[i] - step)) / (2 * eps)
        assert float((fd - jv[i, :, 0]).norm() / fd.norm()) < 1e-6
    # the adjoint is consistent: <J v, u> = <v, Jᵀ u>
    u = torch.randn(2, op.out_dim, 1, dtype=torch.float64)
    lhs = (jv * u).sum(dim=(1, 2))
    rhs = (v * op.rmatvec(u)).sum(dim=(1, 2))
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


def test_the_users_attention_backend_is_restored():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(2)
    model, loss = token_classifier(), nn.CrossEntropyLoss()
    ids, y = torch.randint(0, V, (2, T)), torch.tensor([1, 0])
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
        gradient_jacobian(model, loss, ids, y, embedding_module="embed").matvec(torch.randn(2, T * D, 1))
        assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flash_before


def test_embedding_module_errors_name_what_exists():
    model, loss = token_classifier(), nn.CrossEntropyLoss()
    ids, y = torch.randint(0, V, (2, T)), torch.tensor([1, 0])
    with pytest.raises(ValueError, match=r"no submodule 'embedding'.*\['embed'\]"):
        gradient_jacobian(model, loss, ids, y, embedding_module="embedding")
    with pytest.raises(ValueError, match="not a submodule"):
        gradient_jacobian(model, loss, ids, y, embedding_module=nn.Embedding(V, D))


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


def _batch_gradient(model: nn.Module, loss: nn.Module, X: Tensor, Y: Tensor) -> Tensor:
    """B × the batch gradient as training computes it: BatchNorm on batch statistics, dropout off (a copy,
    so that the running statistics are not updated)."""
    m = copy.deepcopy(model)
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    m.zero_grad()
    (loss(m(X), Y) * X.shape[0]).backward()
    return _flat_grads(m)


def test_train_mode_batchnorm_jacobian_is_that_of_the_function_trained():
    torch.manual_seed(3)
    model, loss = _bn_net(), nn.CrossEntropyLoss()
    model.train()
    X, Y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    running = model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked)
    op = batch_gradient_jacobian(model, loss, X, Y, [1, 4])
    dense = op.dense()
    assert op.fallback_reason is None, op.fallback_reason  # vmapped: nothing is written in place
    assert torch.equal(model[1].running_mean, running[0]) and torch.equal(model[1].running_var, running[1])
    assert int(model[1].num_batches_tracked) == running[2]
    assert model.training and model[1].track_running_stats and model[3].training  # flags restored
    eps = 1e-5
    for row, i in enumerate([1, 4]):
        v = torch.randn(X[0].numel(), dtype=torch.float64)
        Xp, Xm = X.clone(), X.clone()
        Xp[i] += eps * v.reshape(X[0].shape)
        Xm[i] -= eps * v.reshape(X[0].shape)
        fd = (_batch_gradient(model, loss, Xp, Y) - _batch_gradient(model, loss, Xm, Y)) / (2 * eps)
        assert float((fd - dense[row] @ v).norm() / fd.norm()) < 1e-6
        # the running-statistics Jacobian is a different function: the gap is large, not rounding
        running_op = gradient_jacobian(model, loss, X[i : i + 1], Y[i : i + 1])
        assert float((running_op.dense()[0] @ v - fd).norm() / fd.norm()) > 0.1


def test_batch_statistics_reproduce_the_training_forward_and_leave_the_model_alone():
    """Held as eval-mode buffers, the statistics give each sample exactly the output training computes."""
    torch.manual_seed(6)
    model = _bn_net()
    model[3].p = 0.0  # dropout off in both, so the outputs are comparable
    X = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = batch_statistics(model.train(), X)
    assert set(stats) == {"1.running_mean", "1.running_var"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "running statistics moved"
    trained = copy.deepcopy(model).train()(X)
    frozen = torch.func.functional_call(copy.deepcopy(model).eval(), stats, (X,))
    torch.testing.assert_close(frozen, trained, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"has no buffers \['nope'\]"):
        gradient_jacobian(model, nn.CrossEntropyLoss(), X[:1], torch.tensor([0]), buffers={"nope": X})


def test_without_batchnorm_the_batch_jacobian_is_the_per_sample_one():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, Y = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randint(0, 3, (4,))
    coupled = batch_gradient_jacobian(model, nn.CrossEntropyLoss(), X, Y, [0, 2]).dense()
    per_sample = gradient_jacobian(model, nn.CrossEntropyLoss(), X[[0, 2]], Y[[0, 2]]).dense()
    torch.testing.assert_close(coupled, per_sample, rtol=1e-10, atol=1e-12)


def test_batch_jacobian_refuses_an_index_outside_the_batch():
    model = _bn_net()
    X, Y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match=r"index must list samples of the batch \(0\.\.2\)"):
        batch_gradient_jacobian(model, nn.CrossEntropyLoss(), X, Y, [3])


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_with_dropout_match_finite_differences(norm: str):
    """Per-sample normalisations need no batch: the per-sample Jacobian (eval mode, dropout off) is exact."""
    torch.manual_seed(5)
    layer = nn.GroupNorm(2, 4) if norm == "group" else nn.LayerNorm([4, 6, 6])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).double().train()
    loss = nn.CrossEntropyLoss()
    X, Y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    op = gradient_jacobian(model, loss, X, Y)
    v = torch.randn(2, X[0].numel(), 1, dtype=torch.float64)
    jv = op.matvec(v)
    assert op.fallback_reason is None and model.training and model[3].training
    eps = 1e-6
    for i in range(2):
        def g(x: Tensor, i: int = i) -> Tensor:
            m = copy.deepcopy(model).eval()
            m.zero_grad()
            loss(m(x.unsqueeze(0)), Y[i : i + 1]).backward()
            return _flat_grads(m)

        step = eps * v[i, :, 0].reshape(X[0].shape)
        fd = (g(X[i] + step) - g(X[i] - step)) / (2 * eps)
        assert float((fd - jv[i, :, 0]).norm() / fd.norm()) < 1e-6


def test_the_batch_jacobian_reports_the_samples_own_gradient_as_its_value():
    torch.manual_seed(7)
    model, loss = _bn_net(), nn.CrossEntropyLoss()
    model[3].p = 0.0
    X, Y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    values = batch_gradient_jacobian(model, loss, X, Y, [2]).values()
    m = copy.deepcopy(model).train()
    m.zero_grad()
    out = m(X)
    loss(out[2:3], Y[2:3]).backward()
    torch.testing.assert_close(values[0], _flat_grads(m), rtol=1e-10, atol=1e-12)
