"""Training-loop defenses: noise on shared gradients and on shared embeddings, as short pipelines
(capture → estimate → plan → draw → record) over one :class:`DefenseSettings` and a placement
(:mod:`invdefend.placements`)."""

from .checks import DefenseError
from .embedding import EmbeddingDefense
from .gradient import DefendedOptimizer, GradientDefense, GradientPlan
from .settings import DefenseSettings

__all__ = ["GradientDefense", "DefendedOptimizer", "GradientPlan", "EmbeddingDefense", "DefenseError", "DefenseSettings"]
