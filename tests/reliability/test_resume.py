"""Exact resume: interrupt a defended run, checkpoint, rebuild everything, continue — bitwise the same.

A checkpoint holds the model, the optimizer (Adam: it has state), the defense (step counter, noise and
probe generators, tracked spectrum and noise plan, failure back-off) and the data-order generator. The
released gradients (or embeddings) and the risk log of the resumed run equal, with ``torch.equal`` and
``==``, those of a run that was never interrupted (CPU, same seed).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from invdefend import EmbeddingDefense, GradientDefense
from invdefend.models import uniform_init_
from inject import after_estimate

STEPS = 9
N_DATA = 64


def _data(kit):
    return kit.make_batch(N_DATA, seed=7)


def _comparable(record) -> dict:
    """A record as a dict without its wall-clock timings (the only field allowed to differ)."""
    return {k: v for k, v in record.to_dict().items() if not k.endswith("seconds")}


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ra:
            va, vb = ra[key], rb[key]
            same = va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb))
            assert same, f"step {ra['step']}: {key} differs: {va!r} != {vb!r}"


# -- gradient defense ------------------------------------------------------------------------------------------
def _gradient_run(kit, model_seed: int, fail_at: set[int]):
    model = kit.make_classifier(seed=model_seed)
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.1, k=4, probes=2, refresh_every=3, sweeps=1, seed=11)

    def hook() -> None:
        if defense.step in fail_at:
            raise RuntimeError("injected")

    after_estimate(defense, hook)
    opt = defense.wrap(torch.optim.Adam(model.parameters(), lr=0.01))
    order = torch.Generator().manual_seed(5)
    return model, loss, defense, opt, order


def _gradient_steps(kit, parts, n: int, released: list, records: list) -> None:
    model, loss, defense, opt, order = parts
    x_all, y_all = _data(kit)
    defense.monitor.subscribe(lambda r: records.append(_comparable(r)))
    for _ in range(n):
        idx = torch.randint(0, N_DATA, (8,), generator=order)
        opt.zero_grad()
        loss(model(x_all[idx]), y_all[idx]).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()  # Adam does not touch .grad: it still holds the released gradient
        released.append(kit.flat_grad(model))


@pytest.mark.parametrize(("stop", "fail_at"), [(4, set()), (3, set()), (5, {3, 4})])
def test_gradient_defense_resumes_bitwise(kit, tmp_path, stop, fail_at):
    ref_released, ref_records = [], []
    _gradient_steps(kit, _gradient_run(kit, 0, fail_at), STEPS, ref_released, ref_records)
    # refreshes at 0, 3, ...; with failures at 3 and 4 the retry back-off leaves step 5 on fallback too
    assert sum(r["fallback"] for r in ref_records) == (3 if fail_at else 0)

    released, records = [], []
    parts = _gradient_run(kit, 0, fail_at)
    _gradient_steps(kit, parts, stop, released, records)
    model, _, defense, opt, order = parts
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "defense": defense.state_dict(),
         "order": order.get_state()},
        path,
    )
    del parts, model, defense, opt, order

    fresh = _gradient_run(kit, 123, fail_at)  # different init: only the checkpoint can make it match
    model, _, defense, opt, order = fresh
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    defense.load_state_dict(state["defense"])
    order.set_state(state["order"])
    _gradient_steps(kit, fresh, STEPS - stop, released, records)

    assert len(released) == STEPS
    for step, (a, b) in enumerate(zip(ref_released, released)):
        assert torch.equal(a, b), f"released gradient of step {step} differs after resume"
    _same_records(ref_records, records)


# -- embedding defense -----------------------------------------------------------------------------------------
def _split_run(kit, seed: int):
    bottom, top = kit.make_bottom(seed=seed), nn.Linear(kit.EMB, kit.CLASSES)
    uniform_init_(top, scale=0.3, generator=torch.Generator().manual_seed(seed))
    defense = EmbeddingDefense(bottom, budget=0.2, k=4, exact_max_dim=8, seed=3).attach()  # top-k path
    opt = torch.optim.Adam([*bottom.parameters(), *top.parameters()], lr=0.01)
    return bottom, top, defense, opt, torch.Generator().manual_seed(9)


def _split_steps(kit, parts, n: int, released: list, records: list) -> None:
    bottom, top, defense, opt, order = parts
    x_all, y_all = _data(kit)
    defense.monitor.subscribe(lambda r: records.append(_comparable(r)))
    for _ in range(n):
        idx = torch.randint(0, N_DATA, (8,), generator=order)
        opt.zero_grad()
        h = bottom(x_all[idx])
        released.append(h.detach().clone())
        nn.functional.cross_entropy(top(h), y_all[idx]).backward()
        opt.step()


def test_embedding_defense_resumes_bitwise(kit, tmp_path):
    ref_released, ref_records = [], []
    _split_steps(kit, _split_run(kit, 0), STEPS, ref_released, ref_records)

    released, records = [], []
    parts = _split_run(kit, 0)
    _split_steps(kit, parts, 4, released, records)
    bottom, top, defense, opt, order = parts
    path = tmp_path / "split.pt"
    torch.save({"bottom": bottom.state_dict(), "top": top.state_dict(), "optimizer": opt.state_dict(),
                "defense": defense.state_dict(), "order": order.get_state()}, path)
    defense.detach()

    fresh = _split_run(kit, 77)
    bottom, top, defense, opt, order = fresh
    state = torch.load(path, weights_only=False)
    bottom.load_state_dict(state["bottom"])
    top.load_state_dict(state["top"])
    opt.load_state_dict(state["optimizer"])
    defense.load_state_dict(state["defense"])
    order.set_state(state["order"])
    _split_steps(kit, fresh, STEPS - 4, released, records)

    for step, (a, b) in enumerate(zip(ref_released, released)):
        assert torch.equal(a, b), f"released embedding of batch {step} differs after resume"
    _same_records(ref_records, records)


def test_checkpoint_is_loadable_with_weights_only(kit, tmp_path):
    """The defense state holds only tensors and plain values: ``torch.load(weights_only=True)`` reads it."""
    parts = _gradient_run(kit, 0, set())
    _gradient_steps(kit, parts, 2, [], [])
    torch.save(parts[2].state_dict(), tmp_path / "d.pt")
    state = torch.load(tmp_path / "d.pt", weights_only=True)
    fresh = _gradient_run(kit, 0, set())[2]
    fresh.load_state_dict(state)
    assert fresh.step == 2
