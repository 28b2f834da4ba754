"""Determinism: the same seed gives identical releases; the secure-RNG mode does not, and says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invdefend import EmbeddingDefense, GradientDefense, InvRE

STEPS = 4


def _gradient_releases(kit, **defense_kwargs) -> list[torch.Tensor]:
    model, loss = kit.make_classifier(seed=0), nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.1, k=4, refresh_every=2, **defense_kwargs)
    opt = defense.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    out = []
    for step in range(STEPS):
        x, y = kit.make_batch(6, seed=step)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
        out.append(kit.flat_grad(model))
    return out


def _embedding_releases(kit, **defense_kwargs) -> list[torch.Tensor]:
    bottom = kit.make_bottom(seed=0)
    EmbeddingDefense(bottom, budget=0.1, k=4, exact_max_dim=8, **defense_kwargs).attach()
    return [bottom(kit.make_batch(5, seed=step)[0]).detach() for step in range(STEPS)]


RELEASES = {"gradient": _gradient_releases, "embedding": _embedding_releases}


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_same_seed_gives_identical_releases(kit, kind):
    a, b = RELEASES[kind](kit, seed=5), RELEASES[kind](kit, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_explicit_generator_is_reproducible_and_equals_its_seed(kit, kind):
    a = RELEASES[kind](kit, generator=torch.Generator().manual_seed(5))
    b = RELEASES[kind](kit, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_different_seeds_give_different_noise(kit, kind):
    a, b = RELEASES[kind](kit, seed=5), RELEASES[kind](kit, seed=6)
    assert all(not torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_global_rng_does_not_leak_into_the_noise(kit, kind):
    """Only the defense's own generators decide the noise: reseeding torch's global RNG changes nothing."""
    torch.manual_seed(1)
    a = RELEASES[kind](kit, seed=5)
    torch.manual_seed(2)
    b = RELEASES[kind](kit, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_secure_rng_is_not_reproducible_and_says_so(kit, kind):
    with pytest.warns(UserWarning, match=r"secure RNG.*NOT reproducible"):
        a = RELEASES[kind](kit, secure_rng=True)
    with pytest.warns(UserWarning, match=r"NOT reproducible"):
        b = RELEASES[kind](kit, secure_rng=True)
    assert all(not torch.equal(u, v) for u, v in zip(a, b))


def test_secure_rng_refuses_a_seed_or_generator(kit):
    with pytest.raises(ValueError, match=r"secure_rng=True cannot take a generator or a seed"):
        GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), secure_rng=True, seed=1)
    with pytest.raises(ValueError, match=r"secure_rng=True cannot take a generator or a seed"):
        EmbeddingDefense(kit.make_bottom(), secure_rng=True, generator=torch.Generator())


def test_secure_rng_checkpoint_holds_no_noise_state(kit):
    with pytest.warns(UserWarning):
        defense = GradientDefense(kit.make_classifier(), nn.CrossEntropyLoss(), secure_rng=True)
    assert defense.state_dict()["noise"] == {}
    assert defense.noise.reproducible is False


def test_invre_is_deterministic_for_a_seed(kit):
    model = kit.make_classifier()
    x, y = kit.make_batch(3)
    a = InvRE(model, nn.CrossEntropyLoss(), k=4, seed=3).assess(x, y)
    b = InvRE(model, nn.CrossEntropyLoss(), k=4, seed=3).assess(x, y)
    assert a.singular_values == b.singular_values and a.predicted_psnr == b.predicted_psnr
