"""Training-loop defenses: spectral noise on shared gradients and on shared embeddings."""

from .common import DefenseError
from .embedding import EmbeddingDefense
from .gradient import DefendedOptimizer, GradientDefense

__all__ = ["GradientDefense", "DefendedOptimizer", "EmbeddingDefense", "DefenseError"]
