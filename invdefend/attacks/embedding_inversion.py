"""Inverting split-learning embeddings: recover the client's input ``x`` from the cut-layer output ``h(x)``.

Two attackers:

* :func:`invert_embedding` — optimisation:
  ``min_{x ∈ [0,1]^d} Σ_b ‖h(x_b) − h̃_b‖² / ‖h̃_b‖² + α_TV·TV(x)`` with Adam (box by clamping each
  step) or L-BFGS (box by a sigmoid reparametrisation ``x = σ(z)``);
* :func:`train_embedding_decoder` + :func:`decoder_attack` — learning: fit a small MLP ``h ↦ x`` on
  auxiliary inputs the attacker owns (optionally on *noised* embeddings, to learn to invert a defended
  release), then decode the observed embeddings in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._common import (
    AttackResult, FunctionalModel, Mode, Timer, check_input_shape, check_positive, make_generator, projected_adam,
)
from ._common import total_variation
from .dlg import random_start

__all__ = ["invert_embedding", "EmbeddingDecoder", "train_embedding_decoder", "decoder_attack", "NoiseSampler"]

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
"""``noise_sampler(inputs, embeddings) -> noise`` shaped like ``embeddings`` (fresh draw per call)."""


def _check_observed(observed: Tensor, batch: int | None, where: str) -> Tensor:
    if not isinstance(observed, Tensor) or observed.dim() != 2:
        shape = tuple(observed.shape) if isinstance(observed, Tensor) else type(observed).__name__
        raise ValueError(
            f"invdefend.{where}: observed embeddings must be a (B, m) tensor, got {shape}; flatten each "
            "sample's embedding and stack them"
        )
    if batch is not None and observed.shape[0] != batch:
        raise ValueError(
            f"invdefend.{where}: observed has {observed.shape[0]} rows but input_shape has batch {batch}"
        )
    return observed.detach()


def invert_embedding(
    bottom: nn.Module,
    observed: Tensor,
    *,
    input_shape: Sequence[int],
    iterations: int = 500,
    lr: float | None = None,
    optimizer: Literal["lbfgs", "adam"] = "adam",
    tv_weight: float = 0.0,
    init: str = "uniform",
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> AttackResult:
    """Recover inputs from their embeddings by matching ``bottom(x)`` to the observed ones.

    Threat model: the split-learning server (or anyone on the link) knows the client's bottom model — its
    architecture and current weights — and observes the embeddings ``h̃ = bottom(x)`` (exact, undefended)
    of a batch; it knows the input shape and that inputs lie in [0, 1]. Samples are reconstructed
    independently (the objective is a sum of per-sample terms).

    Args:
        bottom: the client's bottom model, ``(B, ...) -> (B, m)`` (not modified).
        observed: observed embeddings ``(B, m)`` (outputs of shape ``(B, ...)`` must be flattened).
        input_shape: shape of the attacked batch ``(B, ...)``.
        iterations: L-BFGS iterations or Adam steps.
        lr: step size; default 1 for L-BFGS (strong-Wolfe line search), 0.05 for Adam.
        optimizer: ``"adam"`` (default; x clamped to [0, 1] after every step, which reaches pixels that are
            exactly 0 or 1) or ``"lbfgs"`` (x = sigmoid(z), unconstrained in z; one L-BFGS run of
            ``iterations`` iterations).
        tv_weight: weight of a total-variation prior (images only).
        init: random start, ``"uniform"``, ``"normal"`` or ``"gray"`` (clamped into (0, 1)).
        dtype: work in this dtype (``torch.float64`` helps L-BFGS); default: the model's.
        mode: evaluate ``bottom`` in ``"eval"`` or ``"train"`` mode.
        generator, seed: source of the random start (default ``seed=0``).

    Returns:
        :class:`AttackResult` (``label`` is ``None``).
    """
    where = "attacks.invert_embedding"
    shape = check_input_shape(input_shape, where)
    observed = _check_observed(observed, shape[0], where)
    check_positive(where, iterations=iterations)
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"invdefend.{where}: optimizer={optimizer!r}; choose 'lbfgs' or 'adam'")
    if tv_weight < 0:
        raise ValueError(f"invdefend.{where}: tv_weight={tv_weight} must be >= 0")
    lr = (1.0 if optimizer == "lbfgs" else 0.05) if lr is None else lr
    check_positive(where, lr=lr)
    with Timer() as timer:
        fm = FunctionalModel(bottom, dtype=dtype, mode=mode, where=where)
        target = observed.to(fm.dtype)
        norm2 = target.pow(2).sum(dim=1).clamp_min(torch.finfo(fm.dtype).tiny)
        gen = make_generator(generator, seed, where)
        start = random_start(shape, gen, fm.dtype, init, where).clamp(1e-3, 1 - 1e-3)

        def objective(x: Tensor) -> Tensor:
            h = fm(x).reshape(shape[0], -1)
            if h.shape != target.shape:
                raise ValueError(
                    f"invdefend.{where}: bottom produces embeddings of {h.shape[1]} features but observed has "
                    f"{target.shape[1]}"
                )
            loss = ((h - target).pow(2).sum(dim=1) / norm2).sum()
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(x)
            return loss

        history: list[float] = []
        if optimizer == "lbfgs":
            z = torch.logit(start).requires_grad_(True)
            opt = torch.optim.LBFGS(
                [z], lr=lr, max_iter=iterations, max_eval=2 * iterations, history_size=100,
                tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                opt.zero_grad()
                loss = objective(torch.sigmoid(z))
                loss.backward()
                history.append(float(loss.detach()))
                return loss

            opt.step(closure)
            rec = torch.sigmoid(z).detach()
        else:
            x = start.clone().requires_grad_(True)
            projected_adam(x, objective, iterations, history, lr=lr)
            rec = x.detach()
    return AttackResult(rec, None, history, "invert_embedding", timer.seconds)


class EmbeddingDecoder(nn.Module):
    """An MLP decoder ``h (B, m) -> x (B, *sample_shape)`` with a sigmoid output (pixels in [0, 1]).

    Args:
        embedding_dim: ``m``.
        sample_shape: the shape of one input, e.g. ``(1, 8, 8)``.
        hidden: hidden layer widths (ReLU).
    """

    def __init__(self, embedding_dim: int, sample_shape: Sequence[int], hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        layers: list[nn.Module] = []
        prev = int(embedding_dim)
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU()]
            prev = int(h)
        layers.append(nn.Linear(prev, math.prod(self.sample_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        """Decoded inputs ``(B, *sample_shape)`` in (0, 1)."""
        return torch.sigmoid(self.net(h)).reshape(h.shape[0], *self.sample_shape)


def train_embedding_decoder(
    bottom: nn.Module,
    aux_inputs: Tensor,
    *,
    hidden: Sequence[int] = (256, 256),
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> EmbeddingDecoder:
    """Train an :class:`EmbeddingDecoder` on auxiliary inputs the attacker owns (MSE to the inputs).

    Threat model: the attacker can evaluate the client's bottom model (weights, or query access) and holds
    auxiliary data from the same distribution as the victim's (``aux_inputs``), but none of the victim's
    inputs. If the release is defended by additive noise whose distribution the attacker knows, pass
    ``noise_sampler(inputs, embeddings) -> noise`` (called on every mini-batch, fresh noise each time) and
    the decoder is trained on noised embeddings, i.e. learns the posterior mean under that noise.

    Args:
        bottom: the client's bottom model (not modified; its embeddings are computed without grad).
        aux_inputs: auxiliary inputs ``(N, ...)`` in [0, 1].
        hidden: decoder hidden widths.
        epochs, batch_size, lr, weight_decay: Adam training schedule.
        noise_sampler: optional defense noise to train against.
        mode: evaluate ``bottom`` in ``"eval"`` or ``"train"`` mode.
        generator, seed: seed of the decoder's initialisation and the shuffling (default ``seed=0``); the
            global RNG is left untouched.

    Returns:
        the trained decoder, in eval mode.
    """
    where = "attacks.train_embedding_decoder"
    if not isinstance(aux_inputs, Tensor) or aux_inputs.dim() < 2 or aux_inputs.shape[0] < 1:
        raise ValueError(f"invdefend.{where}: aux_inputs must be a non-empty batch (N, ...) of inputs")
    check_positive(where, epochs=epochs, batch_size=batch_size, lr=lr)
    gen = make_generator(generator, seed, where)
    fm = FunctionalModel(bottom, mode=mode, where=where)
    x_aux = aux_inputs.detach().to(fm.dtype)
    with torch.no_grad():
        h_aux = fm(x_aux).reshape(x_aux.shape[0], -1).detach()
    init_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        decoder = EmbeddingDecoder(h_aux.shape[1], x_aux.shape[1:], hidden).to(fm.dtype)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_aux.shape[0]
    decoder.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            h = h_aux[idx]
            if noise_sampler is not None:
                noise = noise_sampler(x_aux[idx], h)
                if noise.shape != h.shape:
                    raise ValueError(
                        f"invdefend.{where}: noise_sampler returned shape {tuple(noise.shape)} for embeddings "
                        f"{tuple(h.shape)}; return noise shaped like the embeddings"
                    )
                h = h + noise.to(h.dtype)
            opt.zero_grad()
            loss = (decoder(h) - x_aux[idx]).pow(2).mean()
            loss.backward()
            opt.step()
    decoder.eval()
    return decoder


@torch.no_grad()
def decoder_attack(decoder: nn.Module, observed: Tensor) -> AttackResult:
    """Decode observed embeddings ``(B, m)`` with a trained decoder (see :func:`train_embedding_decoder`).

    Threat model: as for :func:`train_embedding_decoder` (bottom-model access and auxiliary data), plus the
    observed embeddings of the victim's batch.
    """
    where = "attacks.decoder_attack"
    observed = _check_observed(observed, None, where)
    with Timer() as timer:
        dtype = next(decoder.parameters()).dtype
        was_training = decoder.training
        decoder.eval()
        try:
            rec = decoder(observed.to(dtype)).detach()
        finally:
            decoder.train(was_training)
    return AttackResult(rec, None, [], "embedding_decoder", timer.seconds)
