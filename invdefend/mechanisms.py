"""Compatibility names: the pieces that lived here moved to modules that say what they hold.

* allocations (water-filling, the frontier's placement variances): :mod:`invdefend.allocation`;
* noise sources: :mod:`invdefend.noise`;
* band-pass matrix-function noise: :mod:`invdefend.placements.band_pass`.
"""

from .allocation import placement_variances, water_filling, water_filling_at_level, water_filling_for_target
from .noise import NoiseSource, SecureNoise, SeededNoise, make_noise_source, shaped_noise
from .placements.band_pass import band_pass_noise

__all__ = [
    "water_filling", "water_filling_at_level", "water_filling_for_target", "placement_variances",
    "NoiseSource", "SeededNoise", "SecureNoise", "make_noise_source", "shaped_noise", "band_pass_noise",
]
