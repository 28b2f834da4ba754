"""Clean detach: removing a defense removes every hook it installed, and the model behaves as before."""

from __future__ import annotations

import copy

import torch
from torch import nn

from invdefend import EmbeddingDefense, GradientDefense


def _hook_counts(module: nn.Module) -> tuple[int, int, int]:
    """Forward pre-hooks, forward hooks and backward hooks on ``module`` and all its submodules."""
    pre = sum(len(m._forward_pre_hooks) for m in module.modules())
    fwd = sum(len(m._forward_hooks) for m in module.modules())
    bwd = sum(len(m._backward_hooks) + len(m._backward_pre_hooks) for m in module.modules())
    return pre, fwd, bwd


def _train(model, opt, loss, kit, steps: int, seed: int) -> list[torch.Tensor]:
    grads = []
    for step in range(steps):
        x, y = kit.make_batch(5, seed=seed + step)
        opt.zero_grad()
        loss(model(x), y).backward()
        grads.append(kit.flat_grad(model))
        opt.step()
    return grads


def test_gradient_defense_detach_removes_its_hooks_and_only_its_hooks(kit):
    model, loss = kit.make_classifier(), nn.CrossEntropyLoss()
    user_hook = model.register_forward_pre_hook(lambda m, a: None)  # the user's own hook must survive
    before = (_hook_counts(model), _hook_counts(loss))
    defense = GradientDefense(model, loss, k=2)
    assert len(model._forward_pre_hooks) == 2 and len(loss._forward_pre_hooks) == 1
    defense.detach()
    assert (_hook_counts(model), _hook_counts(loss)) == before
    assert list(model._forward_pre_hooks) == [user_hook.id] and not loss._forward_pre_hooks
    defense.detach()  # idempotent
    user_hook.remove()
    assert _hook_counts(model) == (0, 0, 0)


def test_after_detach_training_is_bitwise_that_of_a_never_defended_model(kit):
    model = kit.make_classifier(seed=4)
    twin = copy.deepcopy(model)  # identical, never sees a defense
    loss = nn.CrossEntropyLoss()
    defense = GradientDefense(model, loss, budget=0.2, k=2, seed=0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = defense.wrap(inner)
    # a defended phase changes the weights: copy them to the twin, then both train without any defense
    _train(model, wrapped, loss, kit, steps=2, seed=0)
    defense.detach()
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(inner.state_dict()))  # load_state_dict aliases tensors
    ours = _train(model, inner, loss, kit, steps=3, seed=10)  # the original optimizer, as before wrapping
    theirs = _train(twin, twin_opt, nn.CrossEntropyLoss(), kit, steps=3, seed=10)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), "gradients differ after detach"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    x, _ = kit.make_batch(4, seed=99)
    assert torch.equal(model(x), twin(x))
    assert defense.step == 2, "the detached defense kept protecting"


def test_wrapping_leaves_the_original_optimizer_untouched(kit):
    model = kit.make_classifier()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    hooks = (dict(inner._optimizer_step_pre_hooks), dict(inner._optimizer_step_post_hooks))
    groups = [dict(g) for g in inner.param_groups]
    defense = GradientDefense(model, nn.CrossEntropyLoss(), k=2)
    wrapped = defense.wrap(inner)
    assert wrapped.original_optimizer is inner
    assert (dict(inner._optimizer_step_pre_hooks), dict(inner._optimizer_step_post_hooks)) == hooks
    assert [dict(g) for g in inner.param_groups] == groups
    assert type(inner) is torch.optim.Adam and "step" not in vars(inner)
    defense.detach()


def test_embedding_defense_detach_restores_clean_embeddings(kit):
    bottom = kit.make_bottom(seed=2)
    twin = copy.deepcopy(bottom)
    before = _hook_counts(bottom)
    defense = EmbeddingDefense(bottom, budget=0.2, seed=0).attach()
    assert _hook_counts(bottom)[1] == before[1] + 1 and defense.attached
    x, _ = kit.make_batch(4)
    assert not torch.equal(bottom(x), twin(x))  # protected while attached
    defense.detach()
    assert _hook_counts(bottom) == before and not defense.attached
    defense.detach()  # idempotent
    steps = defense.step
    x.requires_grad_(True)
    out, ref = bottom(x), twin(x)
    assert torch.equal(out, ref)
    g1 = torch.autograd.grad(out.sum(), [x, *bottom.parameters()])
    x2 = x.detach().clone().requires_grad_(True)
    g2 = torch.autograd.grad(twin(x2).sum(), [x2, *twin.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert defense.step == steps, "the detached hook still ran"


def test_reattach_after_detach_protects_again(kit):
    bottom = kit.make_bottom(seed=2)
    twin = copy.deepcopy(bottom)
    defense = EmbeddingDefense(bottom, budget=0.2, seed=0).attach()
    defense.detach()
    defense.attach()
    x, _ = kit.make_batch(3)
    assert not torch.equal(bottom(x), twin(x))
    assert _hook_counts(bottom)[1] == 1
    defense.detach()
