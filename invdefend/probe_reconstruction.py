"""Attack one probe sample of a defended run, as a diagnostic: what a fast attacker recovers from it now.

:func:`reconstruct_probe` makes the batch-of-one release of a sample ``(x, y)`` the way a defense releases it
under its public noise law (the clean gradient plus one draw of that law, rescaled to the sample's own
``‖g‖²`` so the relative noise energy is the plan's), then runs a short attack on it: the defense-aware MAP
attack (:func:`~invdefend.attacks.defense_aware_gradient_attack`) when the release is noisy, DLG
(:func:`~invdefend.attacks.dlg`) when it is not. It returns the reconstruction, its PSNR and SSIM
(:mod:`invdefend.metrics`) and the seconds it took.

It is side-effect free for the training it observes: the model is evaluated on detached copies of its
parameters (``torch.func.functional_call``; no ``.grad`` is touched, the train/eval flags are restored), and
every random draw comes from its own ``torch.Generator`` (the global RNG and the defense's noise and probe
streams are not used). The release it attacks is simulated and never leaves the process.

:class:`~invdefend.defense.GradientDefense` runs it at refresh steps with ``reconstruct_probe=<iterations>``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attacks import defense_aware_gradient_attack, dlg, model_gradient
from .metrics import PSNR_CAP_DB, psnr, ssim
from .noise_law import BandPassLaw, NoiseCovariance, NoiseLaw
from .prior import GaussianPrior

__all__ = ["MAX_PSNR_DB", "ProbeReconstruction", "reconstruct_probe", "release_law"]

#: PSNR of an exact reconstruction is +inf; it is reported as this many dB (a finite point in TensorBoard), the
#: cap every report of the library uses (:data:`invdefend.metrics.PSNR_CAP_DB`).
MAX_PSNR_DB = PSNR_CAP_DB


@dataclass(frozen=True)
class ProbeReconstruction:
    """One attacked probe.

    Attributes:
        original: the sample ``(1, ...)`` (float64, detached).
        reconstruction: the attack's estimate of it, same shape, in ``[0, 1]``.
        psnr, ssim: of the reconstruction against the original (``data_range`` as given; PSNR capped at
            :data:`MAX_PSNR_DB`).
        seconds: wall time of the whole diagnostic (gradient, draw, attack, metrics).
        attack: ``"defense_aware_gradient"`` or ``"dlg"``.
        relative_noise_energy: ``‖noise‖² / ‖g‖²`` of the attacked release (0 without noise).
    """

    original: Tensor
    reconstruction: Tensor
    psnr: float
    ssim: float
    seconds: float
    attack: str
    relative_noise_energy: float


def release_law(noise_law: NoiseLaw | None, scale: float = 1.0) -> NoiseCovariance | None:
    """The Gaussian law a probe release is drawn from and attacked under, its variances times ``scale``.

    A :class:`~invdefend.noise_law.NoiseCovariance` is used as it is; a band-pass law by its isotropic floor
    only (its operator part needs the sample's exact spectrum; the defense records band-pass risk on the floor
    alone too, so the diagnostic is pessimistic in the same way). None, or no noise at all: None.
    """
    if noise_law is None:
        return None
    if isinstance(noise_law, BandPassLaw):
        variance = noise_law.isotropic_variance
        return NoiseCovariance(sigma2_iso=variance * scale) if variance > 0 else None
    if isinstance(noise_law, NoiseCovariance):
        return noise_law.scaled(scale)
    raise TypeError(f"invdefend.reconstruct_probe: unknown noise law {type(noise_law).__name__}")


def _draw(law: NoiseCovariance, m: int, generator: torch.Generator) -> Tensor:
    """One draw ``(m,)`` of ``law`` in float64 (an isotropic law has no dimension of its own)."""
    if law.dim is not None:
        return law.sample((), generator, dtype=torch.float64)
    return torch.randn(m, generator=generator, dtype=torch.float64) * math.sqrt(float(law.sigma2_iso))


def _check_sample(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"invdefend.reconstruct_probe: x must be one floating-point sample as a batch of one (1, ...), got "
            f"{shape}; token ids cannot be reconstructed by gradient matching"
        )
    if not isinstance(y, Tensor) or y.shape[:1] != (1,):
        raise ValueError(f"invdefend.reconstruct_probe: y must be the sample's target as a batch of one (1, ...), "
                         f"got {tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")


def reconstruct_probe(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    noise_law: NoiseLaw | None,
    *,
    iterations: int = 40,
    law_energy: float | None = None,
    prior: GaussianPrior | None = None,
    mode: str = "eval",
    data_range: float = 1.0,
    seed: int = 0,
) -> ProbeReconstruction:
    """Release ``(x, y)`` alone under ``noise_law`` and attack it for ``iterations`` L-BFGS iterations.

    Args:
        model: the model at the weights the release is made at (not modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        x, y: one sample as a batch of one: ``(1, ...)`` floating-point inputs in ``[0, data_range]`` and its
            target ``(1,)``.
        noise_law: the defense's public law (:meth:`~invdefend.defense.GradientDefense.noise_law`), or None
            for a release without noise (monitor mode).
        iterations: attack iterations (L-BFGS, run in chunks of 20, so 40 means two chunks), >= 1.
        law_energy: the ``‖ḡ‖²`` the law's variances are in units of; the law is rescaled to the sample's own
            ``‖g‖²`` (the relative noise energy of a batch-of-one release under the same plan). None: use the
            law's variances as they are.
        prior: a Gaussian image prior the defense-aware attacker holds (the defense's data prior); None: i.i.d.
        mode: evaluate the model in ``"eval"`` or ``"train"`` mode (as the defense does).
        data_range: the inputs' dynamic range, for PSNR and SSIM.
        seed: seeds this diagnostic's own generator (the noise draw and the attack's start).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"invdefend.reconstruct_probe: iterations={iterations!r} must be an integer >= 1")
    _check_sample(x, y)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    original = x.detach().to(torch.float64)
    clean = model_gradient(model, original, y, loss_fn, mode=mode, dtype=torch.float64)  # type: ignore[arg-type]
    energy = float(clean.pow(2).sum())
    scale = 1.0 if law_energy is None or law_energy <= 0 else energy / law_energy
    law = release_law(noise_law, scale)
    shape = tuple(original.shape)
    if law is None:
        released, rel = clean, 0.0
        result = dlg(model, released, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations,
                     dtype=torch.float64, mode=mode, generator=gen)  # type: ignore[arg-type]
    else:
        noise = _draw(law, clean.numel(), gen)
        released, rel = clean + noise, float(noise.pow(2).sum()) / max(energy, 1e-300)
        with_prior = {} if prior is None else {"prior": prior}  # else the attack's i.i.d. pixel prior
        result = defense_aware_gradient_attack(
            model, released, noise=law, input_shape=shape, labels=y, loss_fn=loss_fn, iterations=iterations,
            mode=mode, generator=gen, **with_prior,  # type: ignore[arg-type]
        )
    rec = result.reconstruction.detach().to(torch.float64).reshape(shape)
    quality = float(psnr(rec, original, data_range, max_db=MAX_PSNR_DB, batched=True)[0])
    similarity = float(_ssim(rec, original, data_range))
    return ProbeReconstruction(original, rec, quality, similarity, time.perf_counter() - t0, result.attack, rel)


def _ssim(a: Tensor, b: Tensor, data_range: float) -> Tensor:
    """SSIM of two batch-of-one samples; a sample without an image layout is compared as one row."""
    if a.dim() == 4:
        return ssim(a[0], b[0], data_range)
    return ssim(a.reshape(1, -1), b.reshape(1, -1), data_range)
