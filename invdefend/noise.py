"""Where Gaussian noise comes from, and the simplest way to shape it.

:class:`SeededNoise` draws from an explicit ``torch.Generator`` (reproducible, checkpointable);
:class:`SecureNoise` from the operating system's CSPRNG (``os.urandom`` through Box–Muller: not
reproducible, for production). :func:`shaped_noise` draws noise of given variances along given directions.
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["NoiseSource", "SeededNoise", "SecureNoise", "make_noise_source", "shaped_noise"]


class NoiseSource(Protocol):
    """Where Gaussian noise comes from."""

    reproducible: bool

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples."""

    def state_dict(self) -> dict:
        """State to checkpoint (empty for non-reproducible sources)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class SeededNoise:
    """Reproducible noise from an explicit ``torch.Generator`` (CPU generator; samples moved to device)."""

    reproducible = True

    def __init__(self, generator: torch.Generator | None = None, seed: int | None = None) -> None:
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        elif seed is not None:
            raise ValueError("invdefend.noise.SeededNoise: pass a generator or a seed, not both")
        self.generator = generator

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples drawn from the generator."""
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device).to(device)

    def state_dict(self) -> dict:
        """The generator state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator state."""
        self.generator.set_state(state["generator"])


class SecureNoise:
    """Gaussian noise from the operating system's CSPRNG (``os.urandom``) by the Box–Muller transform.

    Not reproducible by design: the same seed does not exist, and checkpoints hold no noise state.
    """

    reproducible = False

    def __init__(self) -> None:
        warnings.warn(
            "invdefend: secure RNG mode draws noise from os.urandom; releases are NOT reproducible and "
            "a resumed run will not repeat the noise of an uninterrupted one",
            UserWarning,
            stacklevel=3,
        )

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal samples from ``os.urandom``."""
        n = int(np.prod(shape)) if shape else 1
        half = (n + 1) // 2
        raw = np.frombuffer(os.urandom(16 * half), dtype=np.uint64).reshape(2, half)
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        return torch.from_numpy(z.reshape(shape)).to(dtype=dtype, device=device)

    def state_dict(self) -> dict:
        """Nothing: secure noise has no reproducible state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


def make_noise_source(generator: torch.Generator | None = None, seed: int | None = None, secure: bool = False) -> NoiseSource:
    """A :class:`SecureNoise` when ``secure`` (generator/seed must then be None), else :class:`SeededNoise`."""
    if secure:
        if generator is not None or seed is not None:
            raise ValueError("invdefend.noise: secure_rng=True cannot take a generator or a seed")
        return SecureNoise()
    return SeededNoise(generator, seed)


def shaped_noise(basis: Tensor, variances: Tensor, source: NoiseSource) -> Tensor:
    """``Σ_i sqrt(τ_i)·z_i·u_i`` with ``z ~ N(0, I)``: noise of variance ``τ_i`` along each column ``u_i``.

    ``basis`` is ``(..., m, k)`` and ``variances`` ``(..., k)``; the result is ``(..., m)``.
    """
    z = source.normal(tuple(variances.shape), basis.dtype, basis.device)
    return (basis @ (variances.clamp_min(0).sqrt() * z).unsqueeze(-1)).squeeze(-1)
