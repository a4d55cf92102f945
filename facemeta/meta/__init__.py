"""facemeta.meta: generic meta-learning for any ``nn.Module`` and loss (no faces, no other facemeta).

- ``functional``: run a module at a params dict (``functional_forward``), BatchNorm policy.
- ``MAML``: first/second order, k inner steps, optional learned per-layer/per-step learning rates.
- ``Reptile``: k inner-optimiser steps on a copy, θ ← θ + ε·mean(θ̃ − θ).
- ``meta_train_test_step`` / ``MLDG``: γ L_S(θ) + (1 − γ) L_T(θ − α∇L_S), the step MFR and CDT use.
- ``EpisodeSampler``: reproducible N-way K-shot episodes over any labels.
"""

from .episodes import Episode, EpisodeSampler, episode_tensors
from .functional import Params, detached_params, functional_forward, named_buffers, named_params, sgd_update
from .maml import MAML
from .mldg import MLDG, MetaStepResult, meta_train_test_step
from .reptile import Reptile

__all__ = [
    "Episode",
    "EpisodeSampler",
    "episode_tensors",
    "Params",
    "detached_params",
    "functional_forward",
    "named_buffers",
    "named_params",
    "sgd_update",
    "MAML",
    "MLDG",
    "MetaStepResult",
    "meta_train_test_step",
    "Reptile",
]
