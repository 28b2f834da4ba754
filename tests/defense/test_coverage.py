"""Fail closed on coverage: every parameter the wrapped optimizer steps gets the defense's noise, or the step
refuses. Token-id models are defended through their embedding module, the table included; a stock
``nn.TransformerEncoder`` trains with no fallback step; train-mode BatchNorm is estimated as trained."""

from __future__ import annotations

import warnings

import pytest
import torch
from recording import RecordingSGD
from torch import Tensor, nn

from invdefend import DefenseError, GradientDefense
from invdefend.jacobian import (
    batch_gradient_jacobian,
    batch_statistics,
    gradient_jacobian,
)
from invdefend.models import TextTransformer
from invdefend.spectral import exact_spectrum

V, T, D, C = 60, 6, 8, 3


def token_classifier() -> nn.Module:
    """Token ids -> embedding + learned positions -> stock TransformerEncoder (2 layers) -> mean pool -> classes."""
    return TextTransformer(vocab=V, seq_len=T, num_classes=C, dim=D, depth=2, heads=2, mlp=16, dropout=0.1)


def _token_batch(gen: torch.Generator, B: int = 8) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, V, (B, T), generator=gen)
    return ids, ids[:, 0] % C


def test_a_stock_transformer_on_token_ids_trains_with_no_fallback_and_every_gradient_noised():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model, loss = token_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, embedding_module="embed", budget=0.05, refresh_every=3, seed=0)
    inner = RecordingSGD(model.parameters())
    opt = defense.wrap(inner)
    params = list(model.parameters())
    at = next(i for i, p in enumerate(params) if p is model.embed.weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(7):
            ids, y = _token_batch(gen)
            opt.zero_grad()
            loss(model(ids), y).backward()
            raw = [p.grad.detach().clone() for p in params]
            opt.step()
            record = defense.last_record
            assert not record.fallback and record.mechanism == "spectral"
            released = inner.seen[-1]
            for name_p, r, s in zip(model.named_parameters(), raw, released):
                assert s is not None and not torch.equal(r, s), f"{name_p[0]} left with its raw gradient"
            table = released[at]
            raw_table = raw[at]
            assert int((raw_table.abs().sum(1) > 0).sum()) == ids.unique().numel() < V
            assert int((table.abs().sum(1) > 0).sum()) == V, "the released table shows which tokens were used"
    ours = [str(w.message) for w in caught if "invdefend" in str(w.message)]
    assert not ours, ours
    refreshes = [r for r in defense.monitor.history if r.refreshed]
    assert len(refreshes) == 3 and all(r.predicted_psnr and not r.fallback for r in refreshes)
    assert defense.spectrum.in_dim == T * D  # the Jacobian is taken with respect to the embedded sequence
    # the risk is per sequence and per token; the tokens' errors average to the sequence's
    for r in refreshes:
        per_token = torch.tensor(r.per_token_predicted_psnr, dtype=torch.float64)
        assert per_token.shape == (defense.probes, T)
        from_tokens = -10 * torch.log10(torch.pow(10.0, -per_token / 10).mean(-1))
        torch.testing.assert_close(from_tokens, torch.tensor(r.predicted_psnr, dtype=torch.float64))


def test_the_old_advice_embedded_inputs_and_the_rest_as_model_is_refused():
    """Defending the model after the embedding while the optimizer steps the table would release the table's
    raw gradient: the step refuses and names the fix."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model, loss = token_classifier(), nn.CrossEntropyLoss()

    class Rest(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos, self.encoder, self.head = model.pos, model.encoder, model.head

        def forward(self, e: Tensor) -> Tensor:
            return self.head(self.encoder(e + self.pos).mean(1))

    rest = Rest()
    defense = GradientDefense(rest, loss, budget=0.05)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    ids, y = _token_batch(gen)
    loss(rest(model.embed(ids)), y).backward()
    before = model.embed.weight.detach().clone()
    with pytest.raises(DefenseError, match=r"1 parameter\(s\).*\(60, 8\).*embedding_module"):
        opt.step()
    assert torch.equal(model.embed.weight, before), "the step went through"
    assert defense.step == 0, "something was released"


def test_a_defense_of_a_sub_module_refuses_to_step_the_rest():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(nn.Sequential(model[2]), loss, budget=0.1, capture=False)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    loss(model(x), y).backward()
    defense.capture(model[1](model[0](x)).detach(), y)
    with pytest.raises(DefenseError, match=r"2 parameter\(s\).*\(5, 6\), \(5,\).*35 entries"):
        opt.step()
    # freezing what the defense does not cover (or leaving it out of the optimizer) is the other fix
    model[0].requires_grad_(False)
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    defense.capture(model[1](model[0](x)).detach(), y)
    opt.step()
    assert not defense.last_record.fallback and defense.last_record.relative_energy > 0


def test_monitor_mode_is_not_refused_and_adds_nothing():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(nn.Sequential(model[2]), loss, mechanism="monitor", capture=False)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    loss(model(x), y).backward()
    defense.capture(model[1](model[0](x)).detach(), y)
    opt.step()
    assert defense.last_record.relative_energy == 0.0


def test_a_token_path_without_floor_is_refused_before_anything_is_released():
    torch.manual_seed(4)
    model, loss = token_classifier(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, embedding_module="embed", floor=0.0, budget=0.05)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    ids, y = _token_batch(torch.Generator().manual_seed(4))
    loss(model(ids), y).backward()
    raw = model.embed.weight.grad.clone()
    with pytest.raises(DefenseError, match=r"no isotropic floor.*which\s+tokens were used; nothing was released"):
        opt.step()
    assert torch.equal(model.embed.weight.grad, raw)
    defense.detach()
    iso = GradientDefense(model, loss, embedding_module="embed", mechanism="isotropic", floor=0.0, budget=0.05)
    model.zero_grad()
    loss(model(ids), y).backward()
    iso.wrap(torch.optim.SGD(model.parameters(), lr=0.1)).step()  # isotropic noise reaches every row
    assert int((model.embed.weight.grad.abs().sum(1) > 0).sum()) == V


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 5 * 5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize("batch_norm", ["batch", "frozen"])
def test_train_mode_batchnorm_is_estimated_on_batch_statistics(batch_norm: str):
    torch.manual_seed(4)
    model, loss = BNNet().double(), nn.CrossEntropyLoss()
    X, Y = torch.randn(5, 3, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    defense = GradientDefense(model, loss, mechanism="monitor", probes=5, k=75, prior=None, seed=0,
                              batch_norm=batch_norm)
    model.train()
    loss(model(X), Y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        record = defense.protect()
    assert not record.fallback
    # the recorded spectrum (all five samples are probes; rows in the defense's order) is the one asked for
    exact = exact_spectrum(batch_gradient_jacobian(model, loss, X, Y, list(range(5))), k=75).singular_values
    frozen = exact_spectrum(gradient_jacobian(model, loss, X, Y, buffers=batch_statistics(model, X)),
                            k=75).singular_values
    running = exact_spectrum(gradient_jacobian(model, loss, X, Y), k=75).singular_values

    def rows(sv: Tensor) -> Tensor:
        return sv[sv[:, 0].argsort()]

    got = rows(defense.spectrum.singular_values)
    torch.testing.assert_close(got, rows(exact if batch_norm == "batch" else frozen), rtol=1e-6, atol=1e-9)
    other = rows(frozen if batch_norm == "batch" else exact)
    assert float((got - other).abs().max() / got.max()) > 1e-3  # the two are different functions
    assert float((got[:, 0] / rows(running)[:, 0]).min()) > 1.3  # running statistics at init: far off


def test_batch_norm_running_warns_once_that_it_prices_another_function():
    torch.manual_seed(5)
    model, loss = BNNet(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.05, batch_norm="running", refresh_every=1, prior=None)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.01))
    X, Y = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            loss(model(X), Y).backward()
            opt.step()
    msgs = [str(w.message) for w in caught if "BatchNorm on batch statistics" in str(w.message)]
    assert len(msgs) == 1 and "batch_norm='running'" in msgs[0]
    with pytest.raises(ValueError, match="batch_norm='stats'; choose 'frozen'"):
        GradientDefense(model, loss, batch_norm="stats")


def test_a_plan_that_leaves_a_parameter_without_noise_is_never_released():
    """The table of an embedding the Jacobian does not reach (embedded inputs, no embedding_module) gets no
    shaped noise; without a floor that step is released under fallback noise instead, and says why."""
    torch.manual_seed(6)

    class EmbeddedIn(nn.Module):  # takes embeddings, but also owns an (unused here) table that is trained
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(V, D)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(T * D, C))

        def forward(self, e: Tensor) -> Tensor:
            return self.head(e)

    model, loss = EmbeddedIn(), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, floor=0.0, prior=None, budget=0.05)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    ids, y = _token_batch(torch.Generator().manual_seed(6))
    e = model.table(ids)
    loss(model(e), y).backward()
    raw = model.table.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"leaves table\.weight without noise.*set floor > 0"):
        opt.step()
    assert defense.last_record.fallback
    assert not torch.equal(model.table.weight.grad, raw)
