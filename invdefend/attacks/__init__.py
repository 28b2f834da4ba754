"""Reconstruction attacks used to audit a release (our own CPU-friendly, seedable implementations).

One attack per module, one calling convention: keyword-only options, a ``generator``/``seed`` for the
random start, and an :class:`AttackResult` back. Attacks never modify the model they attack.

Gradient attacks (horizontal FL / data-parallel training):
    :func:`dlg` (L2 matching, L-BFGS), :func:`inverting_gradients` (cosine + TV, Adam, restarts),
    :func:`idlg_label` / :func:`idlg_attack` (label from the last layer, then DLG),
    :func:`analytic_linear_attack` (exact input of a leading linear layer).
Embedding attacks (vertical FL / split learning):
    :func:`invert_embedding` (optimisation), :func:`train_embedding_decoder` + :func:`decoder_attack`.
Against a noise defense whose distribution is known:
    :class:`NoiseCovariance`, :func:`defense_aware_gradient_attack`, :func:`defense_aware_embedding_attack`.
    Both take an optional fitted Gaussian image prior (``prior=``, :class:`invdefend.prior.GaussianPrior`).
With a learned prior (auxiliary data disjoint from the audited samples):
    :func:`train_gradient_decoder` + :func:`gradient_decoder_attack` (:class:`GradientDecoder`).
Across releases (the same sample released in several rounds, fresh noise, the model moving):
    :func:`multi_release_gradient_attack`.
From a FedAvg client's update after several local steps (what the client sends, not its releases):
    :func:`local_update_attack` (:func:`simulate_local_update`).
Many releases of one model at once (audits, the fidelity study):
    :func:`batched_gradient_attack` (Inverting Gradients or the prior-aware MAP attack), :func:`release_gradients`.
"""

from ._common import (
    AttackResult,
    FunctionalModel,
    LossFn,
    as_flat_gradient,
    flatten_gradients,
    model_gradient,
    per_sample_gradients,
    split_flat,
    total_variation,
    trainable_named_parameters,
)
from .analytic import analytic_linear_attack
from .defense_aware import (
    NoiseCovariance,
    defense_aware_embedding_attack,
    defense_aware_gradient_attack,
    mean_release,
)
from .batched import BatchedAttackResult, batched_gradient_attack, release_gradients
from .dlg import dlg
from .local_update import local_update_attack, simulate_local_update
from .multi_release import multi_release_gradient_attack
from .embedding_inversion import (
    EmbeddingDecoder,
    NoiseSampler,
    decoder_attack,
    invert_embedding,
    train_embedding_decoder,
)
from .idlg import idlg_attack, idlg_label
from .inverting_gradients import inverting_gradients
from .learned_prior import GradientDecoder, GradientNoiseSampler, gradient_decoder_attack, train_gradient_decoder

__all__ = [
    "multi_release_gradient_attack",
    "local_update_attack",
    "simulate_local_update",
    "batched_gradient_attack",
    "BatchedAttackResult",
    "release_gradients",
    "AttackResult",
    "FunctionalModel",
    "LossFn",
    "as_flat_gradient",
    "flatten_gradients",
    "split_flat",
    "model_gradient",
    "per_sample_gradients",
    "total_variation",
    "trainable_named_parameters",
    "dlg",
    "inverting_gradients",
    "idlg_label",
    "idlg_attack",
    "analytic_linear_attack",
    "invert_embedding",
    "EmbeddingDecoder",
    "NoiseSampler",
    "train_embedding_decoder",
    "decoder_attack",
    "NoiseCovariance",
    "mean_release",
    "defense_aware_gradient_attack",
    "defense_aware_embedding_attack",
    "GradientDecoder",
    "GradientNoiseSampler",
    "train_gradient_decoder",
    "gradient_decoder_attack",
]
