"""Composition with Opacus, exercised by real ``PrivacyEngine.make_private`` training loops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

opacus = pytest.importorskip("opacus")

from invdefend.data import digits_split  # noqa: E402
from invdefend.integrations.opacus import OpacusDefense  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Full backward hook"),
              pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")]

BATCH = 32
CLIP = 1.0
DELTA = 1e-5


class Scalars:
    """A minimal SummaryWriter stand-in that keeps what it is given (tag -> [(step, value)])."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((int(step), float(value)))

    def add_histogram(self, tag, values, step):
        pass


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = digits_split()
    return x[:256], y[:256]


def _private(data, *, sigma: float, poisson: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=False)
    engine = opacus.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=CLIP, poisson_sampling=poisson,
            noise_generator=torch.Generator().manual_seed(seed + 100),
        )
    return engine, model, optimizer, loader


def _defense(engine, model, optimizer, criterion, **kwargs) -> OpacusDefense:
    defaults = dict(delta=DELTA, budget=1.0, k=8, probes=2, refresh_every=100, cold_sweeps=6, seed=3)
    defaults.update(kwargs)
    return OpacusDefense(engine, model, optimizer, criterion, **defaults)


class _ReleaseProbe:
    """What the wrapped optimizer is about to apply (``p.grad``) and Opacus's clipped mean (``summed_grad``)."""

    def __init__(self, optimizer) -> None:
        self.released: list[torch.Tensor] = []
        self.clean: list[torch.Tensor] = []
        self.optimizer = optimizer
        optimizer.original_optimizer.register_step_pre_hook(self)

    def __call__(self, inner, args, kwargs):
        opt = self.optimizer
        divisor = opt.expected_batch_size * opt.accumulated_iterations
        params = opt.params
        self.released.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        self.clean.append(torch.cat([(p.summed_grad / divisor).reshape(-1) for p in params]).clone())


def _one_step(data, *, sigma: float, mechanism: str, **kwargs):
    engine, model, optimizer, loader = _private(data, sigma=sigma, poisson=False)
    criterion = nn.CrossEntropyLoss()
    dp = _defense(engine, model, optimizer, criterion, mechanism=mechanism, **kwargs)
    probe = _ReleaseProbe(optimizer)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    return dp, probe


def test_accounting_advances_and_epsilon_is_logged_beside_the_risk(data):
    engine, model, optimizer, loader = _private(data, sigma=1.0, poisson=True)
    accountant_hook = optimizer.step_hook
    writer = Scalars()
    criterion = nn.CrossEntropyLoss()
    dp = _defense(engine, model, optimizer, criterion, budget=0.1, writer=writer)
    assert dp.original_hook is accountant_hook and optimizer.step_hook != accountant_hook
    epsilons = []
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        steps += 1
        epsilons.append(engine.get_epsilon(DELTA))
        if steps == 4:
            break
    # the accountant's hook still ran once per step
    assert sum(h[2] for h in engine.accountant.history) == steps
    assert all(e > 0 for e in epsilons) and all(b > a for a, b in zip(epsilons, epsilons[1:]))
    # one record per step (no empty Poisson batch at this rate), each carrying the ε of its step
    assert dp.empty_steps == 0 and len(dp.records) == steps
    assert [r.extra["epsilon"] for r in dp.records] == pytest.approx(epsilons)
    assert all(r.extra["noise_multiplier"] == 1.0 and r.extra["delta"] == DELTA for r in dp.records)
    assert dp.records[0].predicted_psnr and dp.records[0].relative_energy > 0
    # TensorBoard: ε beside the InvLoss risk, same steps
    assert [v for _, v in writer.scalars["invdefend/gradient/privacy/epsilon"]] == pytest.approx(epsilons)
    assert writer.scalars["invdefend/gradient/risk/predicted_psnr_max"][0][0] == 0
    dp.detach()
    assert optimizer.step_hook is accountant_hook


def test_both_noises_are_in_the_update(data):
    sigma = 0.3
    dp_only, m = _one_step(data, sigma=sigma, mechanism="monitor")
    ours_only, s = _one_step(data, sigma=0.0, mechanism="spectral")
    both, b = _one_step(data, sigma=sigma, mechanism="spectral")
    clean = m.clean[0]
    assert torch.allclose(s.clean[0], clean) and torch.allclose(b.clean[0], clean)
    signal = clean.pow(2).sum().item()
    d = clean.numel()

    # Opacus's noise alone: energy σ²C²d/B² (chi-square with d = 2410 degrees of freedom: ±3 % per std)
    dp_noise = m.released[0] - clean
    expected_dp = sigma**2 * CLIP**2 * d / BATCH**2
    assert dp_noise.pow(2).sum().item() == pytest.approx(expected_dp, rel=0.15)
    assert dp_only.records[0].relative_energy == 0
    assert dp_only.records[0].extra["dp_noise_relative_energy"] == pytest.approx(
        dp_noise.pow(2).sum().item() / signal, rel=1e-4)

    # the defense's noise alone: energy = relative_energy · ‖clipped mean‖²
    ours = s.released[0] - clean
    assert ours.pow(2).sum().item() == pytest.approx(ours_only.records[0].relative_energy * signal, rel=1e-3)
    assert ours_only.records[0].relative_energy > 0.3

    # composed: the same Opacus noise (its accounting hook ran first, its noise untouched) plus the same
    # defense noise (measured against the clipped mean, so the DP noise did not inflate it)
    total = b.released[0] - clean
    assert torch.allclose(total - dp_noise, ours, atol=1e-6)
    assert total.pow(2).sum().item() == pytest.approx(dp_noise.pow(2).sum().item() + ours.pow(2).sum().item(), rel=0.05)
    assert both.records[0].relative_energy == pytest.approx(ours_only.records[0].relative_energy, rel=1e-6)


def test_skipped_steps_release_nothing_and_feed_the_next_step(data):
    engine, model, optimizer, loader = _private(data, sigma=1.0, poisson=False)
    criterion = nn.CrossEntropyLoss()
    dp = _defense(engine, model, optimizer, criterion, budget=0.1)
    batches = iter(loader)
    for i in range(2):  # two physical batches of one logical step, as BatchMemoryManager runs them
        x, y = next(batches)
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        if i == 0:
            optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        if i == 0:
            assert len(dp.records) == 0 and len(engine.accountant.history) == 0
    assert len(dp.records) == 1 and sum(h[2] for h in engine.accountant.history) == 1
    assert dp.last_batch_size == 2 * BATCH


def test_empty_batch_releases_dp_noise_only(data):
    engine, model, optimizer, _ = _private(data, sigma=1.0, poisson=True)
    criterion = nn.CrossEntropyLoss()
    dp = _defense(engine, model, optimizer, criterion, budget=0.1)
    x, y = data
    optimizer.zero_grad()
    criterion(model(x[:0]), y[:0]).backward()
    optimizer.step()
    assert dp.empty_steps == 1 and len(dp.records) == 0
    assert sum(h[2] for h in engine.accountant.history) == 1


def test_function_criterion_and_misuse(data):
    engine, model, optimizer, loader = _private(data, sigma=0.5, poisson=False)
    loss = nn.functional.cross_entropy
    dp = _defense(engine, model, optimizer, loss, budget=0.1)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    dp.criterion(model(x), y).backward()
    optimizer.step()
    assert len(dp.records) == 1 and dp.records[0].relative_energy > 0
    # an evaluation pass between steps (eval mode, grad enabled, no backward) is not taken for training data
    model.eval()
    dp.criterion(model(x[:5]), y[:5])
    model.train()
    optimizer.zero_grad()
    dp.criterion(model(x), y).backward()
    optimizer.step()
    assert len(dp.records) == 2 and dp.last_batch_size == BATCH

    with pytest.raises(TypeError, match="DPOptimizer"):
        OpacusDefense(engine, model, torch.optim.SGD(model.parameters(), lr=0.1), loss)
    with pytest.raises(ValueError, match="delta"):
        OpacusDefense(engine, model, optimizer, loss, delta=0.0)


def test_dp_only_risk_matches_the_core_risk_of_the_same_isotropic_noise(data):
    """extra["dp_predicted_psnr"] (Opacus's noise, per-sample variance (σC)²) equals the predicted PSNR the
    core computes for its own isotropic mechanism at the budget giving the same per-sample variance."""
    sigma = 0.3
    monitor, probe = _one_step(data, sigma=sigma, mechanism="monitor")
    record = monitor.records[0]
    dp_psnr = record.extra["dp_predicted_psnr"]
    assert len(dp_psnr) == 2
    # DP noise lowers the risk, never below what a release revealing nothing has (10·log10(12) dB)
    assert all(10.79 < d < u for d, u in zip(dp_psnr, record.undefended_predicted_psnr))
    clean = probe.clean[0]
    m = clean.numel()
    budget = sigma**2 * CLIP**2 * m / (BATCH**2 * clean.pow(2).sum().item())
    iso, _ = _one_step(data, sigma=0.0, mechanism="isotropic", budget=budget)
    assert iso.records[0].predicted_psnr == pytest.approx(dp_psnr, abs=0.02)
    heavier, _ = _one_step(data, sigma=1.0, mechanism="monitor")
    assert max(heavier.records[0].extra["dp_predicted_psnr"]) < min(dp_psnr)
