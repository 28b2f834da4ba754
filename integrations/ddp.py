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
rest of the gradient does not exist yet. Two modes:

* ``overlap=True`` (default): from the second step on, the step's noise is drawn when its first bucket
  arrives, for the whole parameter vector, scaled to the **previous** step's ``‖g‖²``
  (:meth:`GradientDefense.protect` with ``energy=`` and ``into=``), and every bucket is noised with its
  slice and all-reduced at once, so communication overlaps the backward pass as in plain DDP. The noise
  law is the one the defense publishes; only its scale lags one step: the energy released is
  ``margin·budget·‖g_{t−1}‖²`` instead of ``budget·‖g_t‖²``, a relative energy ``margin·budget·r_t`` with
  ``r_t = ‖g_{t−1}‖²/‖g_t‖²`` (:attr:`SpectralNoiseHookState.last_energy_ratio`, and
  ``record.extra["energy_ratio"]``; ``margin`` is ``scale_margin``, default 1). That is the bound: a step
  whose gradient grew by a factor ``c`` over the previous one gets ``1/c`` of its budget, one that shrank
  gets more. ``benchmarks/ddp_overhead.py`` prints the spread of ``r_t`` it measured; ``scale_margin=2``
  keeps every step at its budget or above unless its gradient more than doubled. The first step, and the
  step after one that failed, wait for their whole gradient; every rank agrees on that without a collective
  (each sees the same failures).
* ``overlap=False``: every step waits. Each bucket's future stays pending until the last bucket of the step
  arrives; the complete local gradient is then protected once — exactly the release a single-process
  :class:`~invdefend.defense.GradientDefense` would make — and only then are the buckets all-reduced. The
  price is the overlap of communication with the backward pass.

**Per-rank noise.** Every rank draws its own noise: with ``seed=`` the defense's noise source is reseeded
with :func:`rank_seed` ``(seed, rank)``, and registration fails if two ranks' noise generators are in the
same state (a peer could regenerate and subtract noise it shares). A seed any peer knows lets that peer
regenerate the noise; outside tests use ``secure_rng=True``.

**No double noise.** The hook is the only caller of ``protect()``: registration refuses a
:class:`~invdefend.defense.DefendedOptimizer`, and a step whose defense was stepped outside the hook
(for example by ``defense.wrap``) fails at the next backward pass.

**Fail closed, together.** Before any bucket is sent the ranks all-reduce a status flag; if any rank could
not protect its gradient (no captured batch, a double-noise violation, a NaN gradient in a waiting step)
every rank raises :class:`~invdefend.defense.DefenseError` and no bucket is sent, so no rank hangs waiting
for a peer. An overlapped step needs no extra collective: a rank that cannot draw its noise sends NaN in
every bucket (nothing of its gradient), a NaN gradient is sent with its noise (NaN carries nothing), and
either way every rank's averaged bucket is NaN, which makes every rank raise
:class:`~invdefend.defense.DefenseError` from the backward pass.

Gradient accumulation with ``no_sync()`` is supported in the sense that the accumulated gradient is
noised once at the synchronising step, but the spectrum is estimated on the last micro-batch only.
"""

from __future__ import annotations

import hashlib
import math
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
        overlap: send each bucket as soon as it is noised, with the noise scaled to the previous step's
            gradient energy (module docstring); False: every step waits for its whole gradient.
        scale_margin: an overlapped step's noise is scaled to ``scale_margin`` times the previous step's
            ``‖g‖²`` (>= 1).

    Attributes:
        steps: steps released through the hook.
        overlapped_steps: of which sent bucket by bucket (the others waited for the whole gradient).
        last_record: the defense's :class:`~invdefend.monitor.ReleaseRecord` of the latest step.
        last_bucket_count: buckets the latest step's gradient came in.
        last_energy_ratio: ``‖g_{t−1}‖²/‖g_t‖²`` of the latest overlapped step (1.0 for a waiting step): the
            noise's relative energy was ``budget`` times this.
    """

    def __init__(
        self,
        defense: GradientDefense,
        *,
        process_group: "dist.ProcessGroup | None" = None,
        keep_noise: bool = False,
        overlap: bool = True,
        scale_margin: float = 1.0,
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
        if not math.isfinite(float(scale_margin)) or float(scale_margin) < 1.0:
            raise ValueError(f"invdefend.integrations.ddp: scale_margin={scale_margin!r} must be a number >= 1")
        self.overlap = bool(overlap)
        self.scale_margin = float(scale_margin)
        self.overlapped_steps = 0
        self.last_energy_ratio = 1.0
        self._energy_prev: float | None = None  # the last step's local ‖g‖² (None: the next step waits)
        self._overlapping = False
        self._sent = 0  # buckets sent in the overlapped step under way
        self._failure = ""  # why this rank could not protect the overlapped step under way
        self._step_failed = False  # set by the all-reduce callbacks of a step that failed on some rank
        self._step_scale = 0.0  # the previous step's ‖g‖² the overlapped step under way is scaled to
        self._noise: Tensor | None = None  # the overlapped step's noise, flat, trainable-parameter order
        self._offsets: dict[int, tuple[int, int]] = {}
        self._step_energy = 0.0
        self._step_grads: list[Tensor] = []  # keep_noise: the step's clean local gradient, flat

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

    # -- overlapped steps ---------------------------------------------------------------------------------
    def _open_overlapped(self) -> None:
        """First bucket of an overlapped step: draw the whole step's noise at the previous step's scale. A rank
        that cannot (no captured batch, a double-noise violation, ...) sends NaN in every bucket instead: it
        releases nothing, its peers are not left waiting, and every rank's averaged bucket is NaN, so every
        rank raises (no extra collective per step)."""
        params = list(trainable_parameters(self.defense.model).values())
        self._offsets, offset = {}, 0
        for p in params:
            self._offsets[id(p)] = (offset, p.numel())
            offset += p.numel()
        self._step_energy = 0.0
        self._step_grads = [torch.zeros(offset, dtype=params[0].dtype)] if self.keep_noise else []
        self._failure = self._violation
        dtype = params[0].dtype if len({p.dtype for p in params}) == 1 else torch.float64
        noise = torch.empty(offset, dtype=dtype, device=params[0].device)
        if not self._failure:
            try:
                self._step_scale = float(self._energy_prev)  # type: ignore[arg-type]
                self.last_record = self.defense.protect(energy=self.scale_margin * self._step_scale, into=noise)
                self._expected_defense_step = self.defense.step
            except Exception as exc:  # reaches the peers as NaN buckets, and this rank's backward as the error
                self._last_exception = exc
                self._failure = f"{type(exc).__name__}: {exc}"
        self._noise = noise

    def _failed_step(self) -> None:
        """A failed step, seen by every rank (called from the all-reduce callbacks, possibly on another
        thread): the next step waits for its whole gradient on every rank. Applied when the next step opens,
        after DDP has waited for every callback of this one, so every rank decides alike."""
        self._step_failed = True

    def _send_overlapped(self, bucket: Any) -> torch.futures.Future:
        """Noise one bucket with its slice of the step's noise and all-reduce it now."""
        import torch.distributed as dist

        assert self._noise is not None
        buffer = bucket.buffer()
        if self._failure:
            buffer.fill_(float("nan"))  # nothing of this rank's gradient leaves
        else:
            grads = [g.view(-1) for g in bucket.gradients()]
            norms = torch._foreach_norm(grads)
            self._step_energy += float(torch.stack([n.double() for n in norms]).pow(2).sum()) if norms else 0.0
            for p, flat in zip(bucket.parameters(), grads):
                start, n = self._offsets[id(p)]
                if self._step_grads:
                    self._step_grads[0][start : start + n] = flat.detach()
                flat.add_(self._noise[start : start + n].to(flat.dtype))
        buffer.div_(self.world_size)
        work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
        return work.get_future().then(_checked_average(self, self._failure))

    def _close_overlapped(self) -> None:
        """Last bucket of an overlapped step: the realised energy ratio, and the scale of the next step."""
        energy = self._step_energy
        if self._failure:
            self._noise, self._energy_prev = None, None
            return
        self.steps += 1
        self.overlapped_steps += 1
        if self.keep_noise:
            self.last_local_gradient = self._step_grads[0] if self._step_grads else None
            self.last_noise = self._noise
        self._noise = None
        if not math.isfinite(energy):  # every rank's average is NaN: every rank resets (in _checked_average too)
            self.last_energy_ratio = float("nan")
            self._energy_prev = None
            return
        self.last_energy_ratio = self._step_scale / energy if energy > 0 else float("inf")
        if self.last_record is not None:
            self.last_record.extra["energy_ratio"] = self.last_energy_ratio
        if energy > 0:  # an all-zero gradient keeps the previous scale (a rank-local reset would desynchronise)
            self._energy_prev = energy

    def _release(self) -> None:
        """Last bucket: protect the whole local gradient, agree on success, then all-reduce every bucket."""
        import torch.distributed as dist

        pending, self._pending = self._pending, []
        self.last_bucket_count = len(pending)
        self._last_exception = None
        energy = sum(float(buffer.double().pow(2).sum()) for buffer, _, _ in pending)  # before the noise
        error = self._protect_local(pending)
        usable = math.isfinite(energy) and energy > 0  # a scale for the next step's noise
        flags = torch.tensor([1 if error else 0, 0 if usable else 1], dtype=torch.int64)
        dist.all_reduce(flags, group=self.process_group)  # every rank learns whether any rank failed
        failed = flags[:1]
        if int(failed.item()) > 0:
            reason = error or "another rank could not protect its gradient"
            exc = DefenseError(
                f"invdefend.integrations.ddp rank {self.rank}: nothing was all-reduced this step ({int(failed.item())} "
                f"rank(s) failed): {reason}"
            )
            for _, fut, _ in pending:
                fut.set_exception(exc)
            self._energy_prev = None  # every rank raises here: every rank's next step waits
            raise exc from self._last_exception
        for buffer, fut, _ in pending:
            buffer.div_(self.world_size)
            work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
            work.get_future().then(_forward_to(fut))
        self.steps += 1
        self.last_energy_ratio = 1.0
        # the next step overlaps on every rank or on none: only if every rank has a scale for its noise
        self._energy_prev = energy if self.overlap and int(flags[1]) == 0 else None


def _forward_to(target: torch.futures.Future) -> Any:
    """A ``then`` callback completing ``target`` with the all-reduced bucket (or its exception)."""

    def complete(done: torch.futures.Future) -> None:
        try:
            target.set_result(done.value()[0])
        except Exception as exc:  # propagate communication errors to DDP's wait()
            target.set_exception(exc)

    return complete


def _checked_average(state: SpectralNoiseHookState, failure: str = "") -> Any:
    """A ``then`` callback returning the all-reduced bucket, or raising :class:`DefenseError` when this rank
    could not protect its gradient (``failure``) or the average holds NaN/Inf (a rank sent NaN: its gradient
    was not finite, or it could not protect it; every rank sees the same average, so every rank raises)."""

    rank = state.rank

    def result(done: torch.futures.Future) -> Tensor:
        averaged = done.value()[0]
        if failure or not bool(torch.isfinite(averaged).all()):
            state._failed_step()
        if failure:
            raise DefenseError(f"invdefend.integrations.ddp rank {rank}: this rank could not protect its gradient and "
                               f"sent NaN instead (nothing of it left): {failure}")
        if not bool(torch.isfinite(averaged).all()):
            raise DefenseError(
                f"invdefend.integrations.ddp rank {rank}: the averaged gradient holds NaN/Inf: another rank could not "
                "protect its gradient, or a rank's gradient was not finite (what it sent carried its noise); lower "
                "the learning rate or clip gradients"
            )
        return averaged

    return result


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
        state._sent = 0
        if state._step_failed:  # the previous step failed on some rank: every rank waits now
            state._step_failed, state._energy_prev = False, None
        state._overlapping = state.overlap and state._energy_prev is not None
        if state._overlapping:
            state._open_overlapped()
    if state._overlapping:
        future = state._send_overlapped(bucket)
        state._sent += 1
        if bucket.is_last():
            state.last_bucket_count = state._sent
            state._close_overlapped()
        return future
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
    overlap: bool = True,
    scale_margin: float = 1.0,
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
        keep_noise, overlap, scale_margin: see :class:`SpectralNoiseHookState`.

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
    state = SpectralNoiseHookState(defense, process_group=process_group, keep_noise=keep_noise, overlap=overlap,
                                   scale_margin=scale_margin)
    ddp_model.register_comm_hook(state, spectral_noise_hook)
    return state
