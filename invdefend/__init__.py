"""invdefend: measure and defeat data-reconstruction attacks on shared gradients and embeddings.

Three pieces, each usable alone:

* :mod:`invdefend.jacobian` and :mod:`invdefend.spectral` — matrix-free Jacobians of what a client shares
  (per-sample gradient, cut-layer embedding) with respect to its input, and their spectra;
* :mod:`invdefend.risk` and :mod:`invdefend.invre` — InvLoss (the best achievable reconstruction error) and
  the InvRE risk estimator;
* :mod:`invdefend.placements` — where the noise goes (one registered class per placement), on top of
  :mod:`invdefend.allocation` (water-filling), :mod:`invdefend.noise` (noise sources) and
  :mod:`invdefend.noise_law` (the public law of a release's noise, which attackers and InvRE read).

The training-loop defenses (:mod:`invdefend.defense`) are short pipelines over them; ``docs/architecture.md``
draws the house.
"""

from ._version import __version__
from .allocation import water_filling, water_filling_for_target
from .defense import DefendedOptimizer, DefenseError, DefenseSettings, EmbeddingDefense, GradientDefense
from .invre import InvRE, RiskReport, estimate_embedding_spectrum, estimate_gradient_spectrum, format_comparison
from .jacobian import JacobianOperator, embedding_jacobian, gradient_jacobian
from .noise_law import BandPassLaw, NoiseCovariance
from .monitor import ReleaseRecord, RiskMonitor
from .prior import GaussianPrior, OnlinePrior
from .risk import DEFAULT_RHO, NoiseModel, RiskEstimate, invloss, leakage, predicted_psnr
from .spectral import Spectrum, estimate_spectrum, exact_spectrum, tail_quadrature, topk_spectrum

__all__ = [
    "__version__",
    "InvRE",
    "RiskReport",
    "format_comparison",
    "estimate_gradient_spectrum",
    "estimate_embedding_spectrum",
    "JacobianOperator",
    "gradient_jacobian",
    "embedding_jacobian",
    "Spectrum",
    "exact_spectrum",
    "topk_spectrum",
    "estimate_spectrum",
    "tail_quadrature",
    "NoiseModel",
    "RiskEstimate",
    "invloss",
    "predicted_psnr",
    "leakage",
    "DEFAULT_RHO",
    "water_filling",
    "water_filling_for_target",
    "GradientDefense",
    "DefendedOptimizer",
    "DefenseSettings",
    "NoiseCovariance",
    "BandPassLaw",
    "EmbeddingDefense",
    "DefenseError",
    "RiskMonitor",
    "ReleaseRecord",
    "GaussianPrior",
    "OnlinePrior",
]
