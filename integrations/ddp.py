"""Spectral noise for ``torch.nn.parallel.DistributedDataParallel``: a communication hook (THEORY §4).

In data-parallel training a rank's local gradient leaves the process in the all-reduce, bucket by
bucket: that is the point where peers see it, so that is where the noise goes::

    model = Net()
    defense = GradientDefense(model, criterion, budget=0.05, secure_rng=True)  # on the *inner* module
    ddp = DistributedDataParallel(model)
    register_spectral_noise_hook(ddp, defense)        # every bucket is noised before it is all-reduced
    optimizer = torch.optim.SGD(ddp.parameters())     # NOT defense.wrap(...): that would noise twice

**When the noise is computed.** The defense's budget is relative to ``‖g‖²``, the rank's *whole* local
gradient, and its allocation lives on the whole parameter vector; while the first buckets are ready the
rest of the gradient does not exist yet. The hook therefore defers: each bucket's future stays pending
until the last bucket of the step arrives, then the complete local gradient (the buckets' views, in
``model.parameters()`` order) is protected once by :meth:`GradientDefense.protect` — exactly the release a
single-process :class:`~invdefend.defense.GradientDefense` would make — and only then are the buckets
all-reduced. The price is the overlap of communication with the backward pass; the gain is that nothing
is released before its noise is known and the budget means the same as everywhere else in invdefend.

**Per-rank noise.** Every rank draws its own noise: with ``seed=`` the defense's noise source is reseeded
with :func:`rank_seed` ``(seed, rank)``, and registration fails if two ranks' noise generators are in the
same state (a peer could regenerate and subtract noise it shares). A seed any peer knows lets that peer
regenerate the noise; outside tests use ``secure_rng=True``.

**No double noise.** The hook is the only caller of ``protect()``: registration refuses a
:class:`~invdefend.defense.DefendedOptimizer`, and a step whose defense was stepped outside the hook
(for example by ``defense.wrap``) fails at the next backward pass.

**Fail closed, together.** Before any bucket is sent the ranks all-reduce a status flag; if any rank could
not protect its gradient (NaN gradient, no captured batch, a double-noise violation) every rank raises
:class:`~invdefend.defense.DefenseError` and no bucket is sent, so no rank hangs waiting for a peer.

Gradient accumulation with ``no_sync()`` is supported in the sense that the accumulated gradient is
noised once at the synchronising step, but the spectrum is estimated on the last micro-batch only.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from invdefend.defense import DefendedOptimizer, DefenseError, GradientDefense
from invdefend.jacobian import trainable_parameters
from invdefend.noise import SeededNoise
from invdefend.monitor import ReleaseRecord

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["SpectralNoiseHookState", "spectral_noise_hook", "register_spectral_noise_hook", "rank_seed"]


def rank_seed(seed: int, rank: int) -> int:
    """The noise seed of ``rank`` for a run seeded with ``seed`` (``seed + rank``; distinct per rank)."""
    if int(seed) != seed or int(rank) != rank or rank < 0:
        raise ValueError(
            f"invdefend.integrations.ddp.rank_seed: seed={seed!r} and rank={rank!r} must be integers, rank >= 0"
        )
    return int(seed) + int(rank)


class SpectralNoiseHookState:
    """The state passed to :func:`spectral_noise_hook` by ``DistributedDataParallel.register_comm_hook``.

    Args:
        defense: a :class:`GradientDefense` built on the DDP-wrapped module (``ddp.module``).
        process_group: the group the buckets are reduced over (default: the world).
        keep_noise: keep :attr:`last_noise` and :attr:`last_local_gradient` (flat, trainable-parameter
            order) of the latest step, for audits and tests; costs two copies of the gradient per step.

    Attributes:
        steps: steps released through the hook.
        last_record: the defense's :class:`~invdefend.monitor.ReleaseRecord` of the latest step.
        last_bucket_count: buckets the latest step's gradient came in.
    """

    def __init__(
        self,
        defense: GradientDefense,
        *,
        process_group: "dist.ProcessGroup | None" = None,
        keep_noise: bool = False,
    ) -> None:
        import torch.distributed as dist

        if not isinstance(defense, GradientDefense):
            raise TypeError(
                f"invdefend.integrations.ddp: defense must be a GradientDefense, got {type(defense).__name__}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "invdefend.integrations.ddp: torch.distributed is not initialised; call "
                "dist.init_process_group(...) before registering the hook"
            )
        self.defense = defense
        self.process_group = process_group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size(process_group)
        self.keep_noise = keep_noise
        self.steps = 0
        self.last_record: ReleaseRecord | None = None
        self.last_noise: Tensor | None = None
        self.last_local_gradient: Tensor | None = None
        self._pending: list[tuple[Tensor, torch.futures.Future, list[tuple[Tensor, Tensor]]]] = []
        self._expected_defense_step = defense.step
        self._violation = ""
        self._last_exception: BaseException | None = None
        self.last_bucket_count = 0

    # -- one step ---------------------------------------------------------------------------------------
    def _begin_step(self) -> None:
        """First bucket of a step: drop what an aborted step left, and check that the defense was stepped
        nowhere but here since the last step."""
        stale, self._pending = self._pending, []
        for _, fut, _ in stale:  # a backward pass that failed before its last bucket
            if not fut.done():
                fut.set_exception(DefenseError("invdefend.integrations.ddp: step aborted before its last bucket"))
        self._violation = ""
        if self.defense.step != self._expected_defense_step:
            self._violation = (
                f"the GradientDefense was stepped {self.defense.step - self._expected_defense_step} time(s) outside "
                "the DDP hook since the last step (is the optimizer wrapped with defense.wrap, or protect() called "
                "by hand?); those gradients were noised twice. Use a plain optimizer with the hook"
            )

    def _protect_local(self, pending: list[tuple[Tensor, torch.futures.Future, list[tuple[Tensor, Tensor]]]]) -> str:
        """Add the defense's noise to the local buckets in place; return an error message, or ``""``."""
        if self._violation:
            return self._violation
        views: dict[int, Tensor] = {}
        for _, _, pairs in pending:
            for p, g in pairs:
                views[id(p)] = g
        params = list(trainable_parameters(self.defense.model).values())
        missing = [i for i, p in enumerate(params) if id(p) not in views]
        if missing:
            return (
                f"{len(missing)} trainable parameter(s) of the defended model (e.g. index {missing[0]}) are not in any "
                "DDP bucket; build the GradientDefense on ddp.module and do not ignore trainable parameters in DDP"
            )
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = views[id(p)].view_as(p)
            before = torch.cat([p.grad.detach().reshape(-1) for p in params]).clone() if self.keep_noise else None
            record = self.defense.protect()
            if before is not None:
                after = torch.cat([p.grad.detach().reshape(-1) for p in params])
                self.last_local_gradient, self.last_noise = before, after - before
        except Exception as exc:  # any failure must reach the collective flag, or the peers would hang
            self._last_exception = exc
            return f"{type(exc).__name__}: {exc}"
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        self.last_record = record
        self._expected_defense_step = self.defense.step
        return ""

    def _release(self) -> None:
        """Last bucket: protect the whole local gradient, agree on success, then all-reduce every bucket."""
        import torch.distributed as dist

        pending, self._pending = self._pending, []
        self.last_bucket_count = len(pending)
        self._last_exception = None
        error = self._protect_local(pending)
        failed = torch.tensor([1 if error else 0], dtype=torch.int64)
        dist.all_reduce(failed, group=self.process_group)  # every rank learns whether any rank failed
        if int(failed.item()) > 0:
            reason = error or "another rank could not protect its gradient"
            exc = DefenseError(
                f"invdefend.integrations.ddp rank {self.rank}: nothing was all-reduced this step ({int(failed.item())} "
                f"rank(s) failed): {reason}"
            )
            for _, fut, _ in pending:
                fut.set_exception(exc)
            raise exc from self._last_exception
        for buffer, fut, _ in pending:
            buffer.div_(self.world_size)
            work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
            work.get_future().then(_forward_to(fut))
        self.steps += 1


def _forward_to(target: torch.futures.Future) -> Any:
    """A ``then`` callback completing ``target`` with the all-reduced bucket (or its exception)."""

    def complete(done: torch.futures.Future) -> None:
        try:
            target.set_result(done.value()[0])
        except Exception as exc:  # propagate communication errors to DDP's wait()
            target.set_exception(exc)

    return complete


def spectral_noise_hook(state: SpectralNoiseHookState, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: noise the rank's local gradient once per step, then average the buckets.

    ``bucket`` is a ``torch.distributed.GradBucket``; the return value a ``torch.futures.Future[Tensor]``
    of the averaged bucket (DDP inspects the annotations at registration and accepts only the real
    classes, which ``from __future__ import annotations`` would turn into strings, hence none here).
    Register it with ``ddp.register_comm_hook(state, spectral_noise_hook)`` (or use
    :func:`register_spectral_noise_hook`). Buckets' futures complete after the last bucket of the step.
    """
    if bucket.index() == 0:  # DDP launches buckets in index order: bucket 0 opens a step
        state._begin_step()
    future: torch.futures.Future = torch.futures.Future()
    state._pending.append((bucket.buffer(), future, list(zip(bucket.parameters(), bucket.gradients()))))
    if bucket.is_last():
        state._release()
    return future


def _noise_fingerprint(defense: GradientDefense) -> str | None:
    """A digest of the defense's noise generator state (None for non-reproducible sources)."""
    if not isinstance(defense.noise, SeededNoise):
        return None
    return hashlib.sha256(defense.noise.generator.get_state().numpy().tobytes()).hexdigest()


def register_spectral_noise_hook(
    ddp_model: "DistributedDataParallel",
    defense: GradientDefense,
    *,
    process_group: "dist.ProcessGroup | None" = None,
    seed: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    keep_noise: bool = False,
) -> SpectralNoiseHookState:
    """Register :func:`spectral_noise_hook` on ``ddp_model``; a collective call (every rank must make it).

    Args:
        ddp_model: the ``DistributedDataParallel`` wrapper.
        defense: a :class:`GradientDefense` built on ``ddp_model.module`` (its capture hooks see the
            batch that DDP's forward passes to the module).
        process_group: the group DDP reduces over (default: the world).
        seed: reseed the defense's noise with :func:`rank_seed` ``(seed, rank)`` (reproducible runs);
            leave None when the defense already has per-rank seeds or ``secure_rng=True``.
        optimizer: the optimizer that will step ``ddp_model``, checked not to be a
            :class:`~invdefend.defense.DefendedOptimizer` (which would noise the gradients a second time).
        keep_noise: see :class:`SpectralNoiseHookState`.

    Raises:
        ValueError: the defense is not on ``ddp_model.module``, the optimizer is wrapped, or two ranks
            would draw the same noise.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"invdefend.integrations.ddp: expected a DistributedDataParallel model, got {type(ddp_model).__name__}"
        )
    if defense.model is not ddp_model.module:
        raise ValueError(
            "invdefend.integrations.ddp: the GradientDefense must be built on ddp_model.module (the wrapped network), "
            "not on the DDP wrapper or a copy: GradientDefense(ddp_model.module, criterion, ...)"
        )
    if isinstance(optimizer, DefendedOptimizer):
        raise ValueError(
            "invdefend.integrations.ddp: the optimizer is a DefendedOptimizer; the DDP hook already protects every "
            "step before the all-reduce, and the wrapped optimizer would add noise again to the averaged gradient. "
            "Pass optimizer.original_optimizer (a plain optimizer) instead"
        )
    ignored = set(getattr(ddp_model, "parameters_to_ignore", ()) or ())
    clash = [name for name in trainable_parameters(defense.model) if name in ignored]
    if clash:
        raise ValueError(
            f"invdefend.integrations.ddp: trainable parameter(s) {clash[:3]} are ignored by DDP, so the hook never sees "
            "their gradient; freeze them (requires_grad=False) or stop ignoring them"
        )
    if seed is not None:
        defense.noise = SeededNoise(seed=rank_seed(seed, dist.get_rank()))
    prints: list[str | None] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(prints, _noise_fingerprint(defense), group=process_group)
    seeded = [p for p in prints if p is not None]
    if len(set(seeded)) != len(seeded):
        raise ValueError(
            "invdefend.integrations.ddp: at least two ranks' noise generators are in the same state, so they would "
            "draw identical noise and a peer could subtract its own copy; pass seed= (seeded per rank with "
            "rank_seed) or build the defense with secure_rng=True"
        )
    state = SpectralNoiseHookState(defense, process_group=process_group, keep_noise=keep_noise)
    ddp_model.register_comm_hook(state, spectral_noise_hook)
    return state
