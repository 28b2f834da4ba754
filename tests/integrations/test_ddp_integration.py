"""The DDP communication hook, run for real: 2 processes, gloo backend, loopback.

The run happens once per module in a subprocess (``python this_file.py OUT``, which ``mp.spawn``s the two
ranks; a spawned child must re-import the function it runs, which pytest's importlib mode does not allow
from a test module). Each rank saves what it saw; the tests compare the ranks' records:

* the gradient DDP leaves in ``.grad`` is the mean over ranks of (clean local gradient + that rank's noise);
* each rank's noise is its own, at the defense's relative energy, added exactly once (the optimizer step
  moves the parameters by ``-lr`` times that gradient and nothing else);
* a wrapped optimizer, a double ``protect()``, identical noise streams and a NaN on one rank are refused,
  the last one on both ranks without a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
LR = 0.1
BATCH = 16
_TEARDOWN_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:  # pragma: no cover - runs in the children
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from invdefend.data import digits_split
    from invdefend.defense import DefenseError, GradientDefense
    from invdefend.integrations.ddp import register_spectral_noise_hook
    from invdefend.models import MLP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x_all, y_all, _, _ = digits_split(seed=0)
    x, y = x_all[rank::world], y_all[rank::world]
    criterion = nn.CrossEntropyLoss()

    def net() -> nn.Module:
        torch.manual_seed(0)  # identical initial weights on both ranks (DDP also broadcasts rank 0's)
        return MLP(64, (16,), 10, activation="sigmoid")

    def defended(seed: int) -> tuple[nn.Module, GradientDefense, DDP]:
        model = net()
        defense = GradientDefense(model, criterion, budget=0.05, k=4, probes=2, refresh_every=2, seed=seed)
        return model, defense, DDP(model, bucket_cap_mb=0.0005)  # 500-byte buckets: two per step

    result: dict = {"steps": [], "errors": {}}
    # --- the normal run: 3 steps with a plain SGD optimizer -------------------------------------------
    model, defense, ddp = defended(seed=0)  # same seed on both ranks; the hook reseeds per rank
    reference = net()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    state = register_spectral_noise_hook(ddp, defense, seed=1234, optimizer=optimizer, keep_noise=True)
    for step in range(STEPS):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        reference.load_state_dict(model.state_dict())
        clean = _flat(torch.autograd.grad(criterion(reference(xb), yb), list(reference.parameters())))
        optimizer.zero_grad()
        criterion(ddp(xb), yb).backward()
        final = _flat(p.grad for p in model.parameters())
        before = _flat(model.parameters())
        optimizer.step()
        result["steps"].append({
            "clean": clean,
            "hook_local": state.last_local_gradient.clone(),
            "noise": state.last_noise.clone(),
            "final": final,
            "before": before,
            "after": _flat(model.parameters()),
            "relative_energy": state.last_record.relative_energy,
            "fallback": state.last_record.fallback,
            "buckets": state.last_bucket_count,
            "energy_ratio": state.last_energy_ratio,
            "overlapped_steps": state.overlapped_steps,
        })
    result["defense_steps"] = defense.step
    result["hook_steps"] = state.steps

    # --- protect() called outside the hook: the next step is refused on both ranks ----------------------
    model2, defense2, ddp2 = defended(seed=0)
    register_spectral_noise_hook(ddp2, defense2, seed=99)
    criterion(ddp2(x[:BATCH]), y[:BATCH]).backward()
    defense2.protect()  # what a DefendedOptimizer's step would do after the all-reduce
    try:
        criterion(ddp2(x[:BATCH]), y[:BATCH]).backward()
        result["errors"]["double"] = ""
    except Exception as exc:
        result["errors"]["double"] = f"{type(exc).__name__}: {exc}"

    # --- a DefendedOptimizer, and two ranks with the same noise stream: refused at registration -----------
    model3, defense3, ddp3 = defended(seed=0)
    for name, kwargs in (("wrapped", {"optimizer": defense3.wrap(torch.optim.SGD(model3.parameters(), lr=LR))}),
                         ("same_seed", {})):
        try:
            register_spectral_noise_hook(ddp3, defense3, **kwargs)
            result["errors"][name] = ""
        except ValueError as exc:
            result["errors"][name] = str(exc)

    # --- a NaN gradient on rank 1 only: both ranks raise, nothing is all-reduced, nobody hangs -------------
    model4, defense4, ddp4 = defended(seed=0)
    register_spectral_noise_hook(ddp4, defense4, seed=7)
    xb = x[:BATCH].clone()
    if rank == 1:
        xb[0, 0, 0, 0] = float("nan")
    try:
        criterion(ddp4(xb), y[:BATCH]).backward()
        result["errors"]["nan"] = ""
    except Exception as exc:
        result["errors"]["nan"] = f"{type(exc).__name__}: {exc}"
    result["nan_defense_steps"] = defense4.step

    # --- a NaN on rank 1 in an overlapped step (the second): sent with its noise, both ranks raise --------
    model5, defense5, ddp5 = defended(seed=0)
    state5 = register_spectral_noise_hook(ddp5, defense5, seed=11)
    criterion(ddp5(x[:BATCH]), y[:BATCH]).backward()  # step 0 waits; it sets the scale of step 1
    xb = x[BATCH : 2 * BATCH].clone()
    if rank == 1:
        xb[0, 0, 0, 0] = float("nan")
    try:
        criterion(ddp5(xb), y[BATCH : 2 * BATCH]).backward()
        result["errors"]["nan_overlapped"] = ""
    except Exception as exc:
        result["errors"]["nan_overlapped"] = f"{type(exc).__name__}: {exc}"
    result["nan_overlapped_steps"] = state5.overlapped_steps
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _main(out_dir: str) -> None:  # pragma: no cover - the subprocess entry point
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_hook")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=240,
    )
    records = [out / f"rank{r}.pt" for r in range(WORLD)]
    if proc.returncode != 0 and all(p.exists() for p in records) and _TEARDOWN_ABORT in proc.stderr:
        # Both ranks ran every scenario and saved their records (the last thing before the barrier); gloo then
        # aborted while the process group was torn down, once in about a dozen .ci/run runs on 2 shared cores.
        # What the tests check is in the records; the abort is reported, not hidden.
        warnings.warn(f"gloo aborted after both ranks saved their records:\n{proc.stderr[-1500:]}", stacklevel=1)
    else:
        assert proc.returncode == 0, f"2-process gloo run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(p, weights_only=False) for p in records]


@pytest.mark.slow
def test_allreduced_gradient_is_the_mean_of_locally_noised_gradients(ranks: list[dict]) -> None:
    assert max(s["buckets"] for s in ranks[0]["steps"]) >= 2, "the run should exercise several buckets per step"
    for step in range(STEPS):
        per_rank = [r["steps"][step] for r in ranks]
        for s in per_rank:
            torch.testing.assert_close(s["hook_local"], s["clean"], atol=1e-6, rtol=1e-5)  # what the hook saw
        expected = sum(s["clean"] + s["noise"] for s in per_rank) / WORLD
        for s in per_rank:
            torch.testing.assert_close(s["final"], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(per_rank[0]["final"], per_rank[1]["final"], atol=0, rtol=0)


@pytest.mark.slow
def test_each_rank_draws_its_own_noise_at_the_budget(ranks: list[dict]) -> None:
    for step in range(STEPS):
        n0, n1 = (r["steps"][step]["noise"] for r in ranks)
        for r in ranks:
            s = r["steps"][step]
            assert not s["fallback"]
            measured = float(s["noise"].double().pow(2).sum() / s["clean"].double().pow(2).sum())
            # overlapped steps are scaled to the previous step's energy: budget × ‖g_{t−1}‖²/‖g_t‖²
            assert measured == pytest.approx(s["relative_energy"] * s["energy_ratio"], rel=1e-3)
            assert 0 < measured < 1
        cos = float(torch.nn.functional.cosine_similarity(n0, n1, dim=0))
        assert abs(cos) < 0.9, f"step {step}: the two ranks' noise is nearly identical (cos {cos:.3f})"
        assert not torch.equal(n0, n1)


@pytest.mark.slow
def test_the_optimizer_applies_the_noise_exactly_once(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["defense_steps"] == STEPS and r["hook_steps"] == STEPS  # protect() ran once per step
        for step, s in enumerate(r["steps"]):
            torch.testing.assert_close(s["after"], s["before"] - LR * s["final"], atol=1e-6, rtol=1e-6)
            # and the averaged gradient is not the clean mean: the noise is there once, not zero times
            clean_mean = sum(q["steps"][step]["clean"] for q in ranks) / WORLD
            assert float((s["final"] - clean_mean).norm()) > 1e-3 * float(clean_mean.norm())


@pytest.mark.slow
def test_steps_after_the_first_overlap_with_the_previous_steps_scale(ranks: list[dict]) -> None:
    """The first step waits for its whole gradient; every later one is sent bucket by bucket, its noise scaled
    to the previous step's energy (the lag the record reports as the energy ratio)."""
    for r in ranks:
        steps = r["steps"]
        assert [s["overlapped_steps"] for s in steps] == [0, 1, 2]
        assert steps[0]["energy_ratio"] == 1.0
        for prev, cur in zip(steps, steps[1:]):
            expected = float(prev["clean"].double().pow(2).sum() / cur["clean"].double().pow(2).sum())
            assert cur["energy_ratio"] == pytest.approx(expected, rel=1e-4)
            assert cur["energy_ratio"] != pytest.approx(1.0, abs=1e-6)  # a real lag, not this step's scale


@pytest.mark.slow
def test_a_nan_in_an_overlapped_step_fails_every_rank(ranks: list[dict]) -> None:
    for r in ranks:
        assert "holds NaN/Inf" in r["errors"]["nan_overlapped"]
        assert r["nan_overlapped_steps"] == 1


@pytest.mark.slow
def test_double_noise_wrapped_optimizer_and_shared_seed_are_refused(ranks: list[dict]) -> None:
    for r in ranks:
        assert "outside the DDP hook" in r["errors"]["double"]
        assert "DefendedOptimizer" in r["errors"]["wrapped"]
        assert "same state" in r["errors"]["same_seed"]


@pytest.mark.slow
def test_a_nan_on_one_rank_fails_every_rank_without_sending(ranks: list[dict]) -> None:
    assert "NaN" in ranks[1]["errors"]["nan"]
    assert "another rank" in ranks[0]["errors"]["nan"]
    assert ranks[0]["nan_defense_steps"] == 1 and ranks[1]["nan_defense_steps"] == 0


def test_rank_seed_is_distinct_per_rank_and_checks_its_arguments() -> None:
    from invdefend.integrations.ddp import rank_seed

    assert len({rank_seed(5, r) for r in range(8)}) == 8
    with pytest.raises(ValueError, match="rank"):
        rank_seed(5, -1)


def test_the_hook_state_needs_an_initialised_process_group() -> None:
    import torch.distributed as dist
    from torch import nn

    from invdefend.defense import GradientDefense
    from invdefend.integrations.ddp import SpectralNoiseHookState

    # Precondition, not a skip: the 2-process runs use spawned workers, so the test process never holds a group.
    assert not (dist.is_available() and dist.is_initialized()), "a process group leaked into the test process"
    defense = GradientDefense(nn.Linear(3, 2), nn.CrossEntropyLoss(), seed=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        SpectralNoiseHookState(defense)
    with pytest.raises(TypeError, match="GradientDefense"):
        SpectralNoiseHookState(object())  # type: ignore[arg-type]
