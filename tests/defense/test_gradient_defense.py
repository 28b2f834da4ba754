"""GradientDefense: where the noise goes, how much of it, fail-closed fallback, target mode, state, drop-in use."""

from __future__ import annotations

import difflib
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from invdefend.defense import DefendedOptimizer, DefenseError, GradientDefense
from invdefend.models import MLP
from invdefend.risk import NoiseModel, invloss, predicted_psnr
from inject import after_estimate
from tiny_problems import flat_grad, make_problem, set_grad


def subspace(defense: GradientDefense) -> torch.Tensor:
    """Orthonormal basis (m, r) of the span of every probe's estimated left singular vectors."""
    U = defense.spectrum.left_vectors  # (P, m, k)
    stacked = U.permute(1, 0, 2).reshape(U.shape[1], -1)
    Q, R = torch.linalg.qr(stacked)
    keep = R.diagonal().abs() > 1e-10 * R.diagonal().abs().max()
    return Q[:, keep]


def draws(defense: GradientDefense, model: nn.Module, g: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` releases of the same gradient (no refresh in between): the noise vectors ``(n, m)``."""
    out = []
    for _ in range(n):
        set_grad(model, g)
        defense.protect()
        out.append(flat_grad(model) - g)
    return torch.stack(out)


def within(mean: float, expected: float, samples: torch.Tensor, z: float = 4.5) -> bool:
    se = float(samples.std()) / math.sqrt(samples.numel())
    return abs(mean - expected) <= z * se + 1e-12 * abs(expected)


@pytest.mark.parametrize("k", [4, 64])  # topk tracking (k < d) and the exact complete spectrum (k >= d)
def test_noise_lies_in_the_estimated_subspace_with_the_budgets_energy(k: int) -> None:
    model, crit, x, y = make_problem()
    budget = 0.2
    defense = GradientDefense(model, crit, budget=budget, k=k, probes=2, refresh_every=10**6, seed=0, floor=0.0,
                              prior=None)  # the water-filling alone (the default adds a floor)
    crit(model(x), y).backward()
    g = flat_grad(model)
    G = float(g @ g)
    record = defense.protect()
    delta = flat_grad(model) - g
    Q = subspace(defense)
    assert Q.shape[1] < g.numel()  # a genuine subspace of parameter space
    outside = delta - Q @ (Q.T @ delta)
    assert float(outside.norm()) <= 1e-9 * float(delta.norm())
    assert float(delta.norm()) > 0
    # The record reports exactly the released energy, and the budget in force.
    assert record.relative_energy == pytest.approx(float(delta @ delta) / G, rel=1e-9)
    assert record.budget == pytest.approx(budget, rel=1e-9)
    assert not record.fallback and record.refreshed
    # E‖δ‖² = budget·‖ḡ‖² (Monte-Carlo over draws on the same spectrum).
    noise = draws(defense, model, g, 600)
    energies = (noise**2).sum(dim=1) / G
    assert within(float(energies.mean()), budget, energies)
    out = noise - (noise @ Q) @ Q.T
    assert float(out.abs().max()) <= 1e-9 * float(noise.abs().max())
    recorded = [r.relative_energy for r in defense.monitor.history[-600:]]
    assert torch.allclose(torch.tensor(recorded, dtype=torch.float64), energies, rtol=1e-9)


def test_floor_adds_isotropic_energy_outside_the_subspace() -> None:
    model, crit, x, y = make_problem(seed=1)
    budget, floor = 0.2, 0.05
    defense = GradientDefense(model, crit, budget=budget, floor=floor, k=4, refresh_every=10**6, seed=1)
    crit(model(x), y).backward()
    g = flat_grad(model)
    G, m = float(g @ g), g.numel()
    defense.protect()
    assert defense.last_record.budget == pytest.approx(budget + floor, rel=1e-9)
    Q = subspace(defense)
    r = Q.shape[1]
    noise = draws(defense, model, g, 800)
    out = noise - (noise @ Q) @ Q.T
    out_energy = (out**2).sum(dim=1) / G
    assert within(float(out_energy.mean()), floor * (m - r) / m, out_energy)
    total = (noise**2).sum(dim=1) / G
    assert within(float(total.mean()), budget + floor, total)


def test_isotropic_baseline_spreads_the_same_energy_everywhere() -> None:
    model, crit, x, y = make_problem(seed=2)
    budget = 0.2
    defense = GradientDefense(model, crit, budget=budget, mechanism="isotropic", k=4, refresh_every=10**6, seed=2)
    crit(model(x), y).backward()
    g = flat_grad(model)
    G, m = float(g @ g), g.numel()
    defense.protect()
    assert defense.last_record.mechanism == "isotropic"
    Q = subspace(defense)
    noise = draws(defense, model, g, 500)
    total = (noise**2).sum(dim=1) / G
    assert within(float(total.mean()), budget, total)
    out = ((noise - (noise @ Q) @ Q.T) ** 2).sum(dim=1) / G
    assert within(float(out.mean()), budget * (m - Q.shape[1]) / m, out)
    # Same energy, different placement: on the exact spectrum (k >= d, no tail approximation) the
    # water-filling predicts a lower PSNR than isotropic noise on the same probes.
    psnr = {}
    for mechanism in ("spectral", "isotropic"):
        model2, crit2, _, _ = make_problem(seed=2)
        other = GradientDefense(model2, crit2, budget=budget, mechanism=mechanism, k=64, seed=2)
        crit2(model2(x), y).backward()
        psnr[mechanism] = other.protect().predicted_psnr
    assert all(s < i for s, i in zip(psnr["spectral"], psnr["isotropic"]))


def test_monitor_mode_adds_no_noise_but_records_risk() -> None:
    model, crit, x, y = make_problem(seed=3)
    defense = GradientDefense(model, crit, mechanism="monitor", k=4, seed=3)
    crit(model(x), y).backward()
    g = flat_grad(model)
    record = defense.protect()
    assert torch.equal(flat_grad(model), g)
    assert record.relative_energy == 0.0 and record.budget == 0.0
    assert record.predicted_psnr == pytest.approx(record.undefended_predicted_psnr)
    assert all(p > 10 * math.log10(12) for p in record.predicted_psnr)


def test_estimation_failure_falls_back_to_conservative_noise_and_logs_it(caplog) -> None:
    model, crit, x, y = make_problem(seed=4, batch=8)
    seen = []
    defense = GradientDefense(model, crit, budget=0.05, k=4, refresh_every=4, seed=4, callbacks=[seen.append])
    failures = {"left": 3}

    def flaky() -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("injected estimation failure")

    after_estimate(defense, flaky)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: the same gradient every step
    noises = []
    with caplog.at_level(logging.WARNING, logger="invdefend"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.zero_grad()
            crit(model(x), y).backward()
            g = flat_grad(model)
            defense.protect()
            noises.append((flat_grad(model) - g, float(g @ g)))
            model.zero_grad()
    records = seen
    # Every step released noise: none went out unprotected.
    assert all(float(n.norm()) > 0 for n, _ in noises)
    fallback_steps = [r.step for r in records if r.fallback]
    # Attempts at steps 0, 1 (retry after 1), 3 (after 2) fail; step 7 (after 4) succeeds.
    assert fallback_steps == [0, 1, 2, 3, 4, 5, 6]
    assert [r.step for r in records if r.refreshed] == [0, 1, 3, 7, 11]
    for r, (n, G) in zip(records, noises):
        if r.fallback:
            assert r.mechanism == "fallback" and "injected estimation failure" in r.fallback_reason
            assert r.budget == defense.fallback_budget == pytest.approx(0.5)
            assert r.relative_energy == pytest.approx(float(n @ n) / G, rel=1e-9)
        else:
            assert r.mechanism == "spectral" and r.fallback_reason == ""
    # Conservative: isotropic, so it is not confined to the (later) estimated subspace, at fallback energy.
    fallback_energy = torch.tensor([r.relative_energy for r in records if r.fallback])
    assert 0.25 < float(fallback_energy.mean()) < 0.75
    assert any(issubclass(w.category, RuntimeWarning) and "estimation failed" in str(w.message) for w in caught)
    assert sum("estimation failed" in m for m in caplog.messages) == 3  # once per failed attempt, not per step


def test_non_convergence_counts_as_failure() -> None:
    model, crit, x, y = make_problem(seed=5)
    defense = GradientDefense(model, crit, k=4, sweeps=1, cold_sweeps=1, max_residual=1e-12, seed=5)
    crit(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        record = defense.protect()
    assert record.fallback and "did not converge" in record.fallback_reason
    assert record.relative_energy > 0


def test_bad_gradient_or_missing_capture_raises_and_releases_nothing() -> None:
    model, crit, x, y = make_problem(seed=6)
    defense = GradientDefense(model, crit, k=4, seed=6)
    crit(model(x), y).backward()
    next(model.parameters()).grad[0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(DefenseError, match="NaN"):
        defense.protect()
    assert all(torch.equal(a.nan_to_num(), p.grad.nan_to_num()) for a, p in zip(before, model.parameters()))
    fresh = GradientDefense(model, lambda out, t: nn.functional.cross_entropy(out, t), k=4)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # a function loss: targets are not captured
    with pytest.raises(DefenseError, match="capture"):
        fresh.protect()
    fresh.capture(x, y)
    assert not fresh.protect().fallback


def test_target_mode_uses_the_smallest_budget_that_reaches_the_target() -> None:
    model, crit, x, y = make_problem(seed=7)
    crit(model(x), y).backward()
    g = flat_grad(model)
    # The predicted PSNR with the default budget, to pick a reachable target between it and the undefended one.
    probe = GradientDefense(model, crit, budget=0.05, k=64, refresh_every=10**6, seed=7, floor=0.0, prior=None)
    probe.capture(x, y)  # built after the forward pass: tell it the batch
    r0 = probe.protect()
    probe.detach()
    target = 0.5 * (max(r0.predicted_psnr) + min(r0.undefended_predicted_psnr))
    set_grad(model, g)
    defense = GradientDefense(model, crit, target_psnr=target, max_budget=10.0, k=64, refresh_every=10**6, seed=7,
                              floor=0.0, prior=None)
    defense.capture(x, y)
    rec = defense.protect()
    defense.detach()
    assert rec.target_reached is True
    assert max(rec.predicted_psnr) <= target + 1e-6
    assert max(rec.predicted_psnr) == pytest.approx(target, abs=0.05)  # not over-protected
    assert 0 < rec.budget < 0.05
    # 5 % less energy misses the target: the budget found is (nearly) the smallest.
    set_grad(model, g)
    smaller = GradientDefense(model, crit, budget=0.95 * rec.budget, k=64, refresh_every=10**6, seed=7, floor=0.0,
                              prior=None)
    smaller.capture(x, y)
    assert max(smaller.protect().predicted_psnr) > target
    smaller.detach()
    # An unreachable target uses max_budget and says so.
    set_grad(model, g)
    capped = GradientDefense(model, crit, target_psnr=11.0, max_budget=1e-4, k=64, refresh_every=10**6, seed=7, floor=0.0,
                             prior=None)
    capped.capture(x, y)
    rec2 = capped.protect()
    assert rec2.target_reached is False and rec2.budget == pytest.approx(1e-4, rel=1e-6)


def test_target_mode_isotropic_baseline() -> None:
    model, crit, x, y = make_problem(seed=8)
    defense = GradientDefense(model, crit, mechanism="isotropic", target_psnr=30.0, max_budget=100.0, k=64, seed=8)
    crit(model(x), y).backward()
    rec = defense.protect()
    assert rec.target_reached is True and max(rec.predicted_psnr) <= 30.0 + 1e-6


def test_recorded_risk_matches_invloss_of_the_allocation() -> None:
    model, crit, x, y = make_problem(seed=9)
    defense = GradientDefense(model, crit, mechanism="monitor", k=64, seed=9)
    crit(model(x), y).backward()
    rec = defense.protect()
    il = invloss(defense.spectrum, NoiseModel(), v0=1 / 12, tail="topk")
    assert rec.predicted_psnr == pytest.approx(predicted_psnr(il).tolist(), rel=1e-9)
    assert defense.spectrum.complete  # k >= d: the exact spectrum, no tail approximation


def test_state_dict_resumes_the_same_noise() -> None:
    def run(steps: int, state=None):
        model, crit, x, y = make_problem(seed=10)
        defense = GradientDefense(model, crit, k=4, refresh_every=2, seed=10)
        if state is not None:
            defense.load_state_dict(state)
        out = []
        for _ in range(steps):
            model.zero_grad()
            crit(model(x), y).backward()
            g = flat_grad(model)
            defense.protect()
            out.append(flat_grad(model) - g)
        return defense, out

    first, noise_a = run(5)
    state = first.state_dict()
    assert state["step"] == 5 and state["spectrum"] is not None and state["plan"] is not None
    resumed, noise_b = run(3, state)
    _, noise_c = run(8)
    for a, b in zip(noise_b, noise_c[5:]):
        assert torch.equal(a, b)
    assert resumed.step == 8


def test_seeded_noise_is_reproducible_and_secure_rng_is_not() -> None:
    outs = []
    for kwargs in ({"seed": 3}, {"seed": 3}, {"generator": torch.Generator().manual_seed(3)}):
        model, crit, x, y = make_problem(seed=11)
        defense = GradientDefense(model, crit, k=4, **kwargs)
        crit(model(x), y).backward()
        g = flat_grad(model)
        defense.protect()
        outs.append(flat_grad(model) - g)
    assert torch.equal(outs[0], outs[1])
    secure = []
    for _ in range(2):
        model, crit, x, y = make_problem(seed=11)
        with pytest.warns(UserWarning, match="os.urandom"):
            defense = GradientDefense(model, crit, k=4, secure_rng=True)
        crit(model(x), y).backward()
        g = flat_grad(model)
        defense.protect()
        secure.append(flat_grad(model) - g)
    assert not torch.equal(secure[0], secure[1]) and float(secure[0].norm()) > 0
    with pytest.raises(ValueError, match="secure_rng"):
        GradientDefense(make_problem()[0], nn.CrossEntropyLoss(), secure_rng=True, seed=1)


def test_refresh_schedule_and_warm_start() -> None:
    model, crit, x, y = make_problem(seed=12, batch=8)
    defense = GradientDefense(model, crit, k=4, refresh_every=3, seed=12)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    for _ in range(7):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    recs = defense.monitor.history
    assert [r.step for r in recs if r.refreshed] == [0, 3, 6]
    starts = [r.estimator_start for r in recs if r.refreshed]
    assert starts[0] == "cold" and all(s.startswith("warm") for s in starts[1:])
    assert all(r.predicted_psnr == [] for r in recs if not r.refreshed)
    assert all(0 <= r.max_residual <= defense.max_residual for r in recs if r.refreshed)


STANDARD_LOOP = """\
model = MLP(12, hidden=(8,), out_features=3).double()
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for x, y in batches:
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
"""

DEFENDED_LOOP = """\
model = MLP(12, hidden=(8,), out_features=3).double()
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
defense = GradientDefense(model, criterion, budget=0.05)
optimizer = defense.wrap(optimizer)
for x, y in batches:
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
"""


def test_drop_in_needs_at_most_three_changed_lines() -> None:
    diff = [line for line in difflib.unified_diff(STANDARD_LOOP.splitlines(), DEFENDED_LOOP.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(diff) <= 3, diff
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 12, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(4)]
    env = {"MLP": MLP, "nn": nn, "torch": torch, "GradientDefense": GradientDefense, "batches": batches}
    torch.manual_seed(0)
    exec(STANDARD_LOOP, plain := dict(env))
    torch.manual_seed(0)
    exec(DEFENDED_LOOP, defended := dict(env))
    assert isinstance(defended["optimizer"], DefendedOptimizer)
    history = defended["defense"].monitor.history
    assert len(history) == 4 and all(r.relative_energy > 0 for r in history)
    # Same start, noisy updates: the weights differ, and only by the noise.
    w_plain = torch.cat([p.reshape(-1) for p in plain["model"].parameters()])
    w_def = torch.cat([p.reshape(-1) for p in defended["model"].parameters()])
    assert not torch.equal(w_plain, w_def)


def test_defended_optimizer_works_with_schedulers_closures_and_detach() -> None:
    model, crit, x, y = make_problem(seed=13)
    defense = GradientDefense(model, crit, k=4, seed=13)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = defense.wrap(inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    sched.step()
    assert torch.is_tensor(loss) and defense.step == 1
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    defense.detach()
    assert not model._forward_pre_hooks and not crit._forward_pre_hooks


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0.0}, "budget"), ({"budget": float("nan")}, "budget"), ({"floor": -1.0}, "floor"),
    ({"mechanism": "laplace"}, "mechanism"), ({"k": 0}, "k="), ({"refresh_every": 1.5}, "refresh_every"),
    ({"oversample": -1}, "oversample"), ({"max_residual": 0}, "max_residual"), ({"mode": "test"}, "mode"),
    ({"target_psnr": 5.0}, "target_psnr"),
])
def test_bad_settings_are_refused_with_the_parameter_named(kwargs, match) -> None:
    model, crit, _, _ = make_problem()
    with pytest.raises(ValueError, match=match):
        GradientDefense(model, crit, **kwargs)


def test_left_subspace_warm_start_beats_a_cold_start_on_new_probes() -> None:
    """New probes every refresh: starting from Jᵀ·U_prev (the previous probes' parameter-space directions)
    leaves a smaller estimator error after one sweep than a random start does, on the same batches."""
    from invdefend.data import digits_split
    from invdefend.models import digits_cnn

    x, y, _, _ = digits_split(seed=0)
    torch.manual_seed(0)
    model, crit = digits_cnn(), nn.CrossEntropyLoss()
    warm = GradientDefense(model, crit, k=8, sweeps=1, refresh_every=1, max_residual=1e9, seed=0)
    warm_err, cold_err = [], []
    for step in range(5):
        xb, yb = x[16 * step : 16 * (step + 1)], y[16 * step : 16 * (step + 1)]
        model.zero_grad()
        crit(model(xb), yb).backward()
        g = [p.grad.clone() for p in model.parameters()]
        rec = warm.protect()
        if step:
            assert rec.estimator_start == "warm"
            warm_err.append(rec.max_residual)
            for p, gp in zip(model.parameters(), g):
                p.grad = gp
            cold = GradientDefense(model, crit, k=8, cold_sweeps=1, max_residual=1e9, seed=step, capture=False)
            cold.capture(xb, yb)
            rec_cold = cold.protect()
            assert rec_cold.estimator_start == "cold"
            cold_err.append(rec_cold.max_residual)
    assert sum(warm_err) < 0.75 * sum(cold_err), (warm_err, cold_err)
