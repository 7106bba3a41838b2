"""Meta-SGD (Li et al. 2017): MAML whose inner step size is a meta-learned tensor per parameter.

The inner step is φ ← θ − α ⊙ ∇L_support(θ), with α the same shape as θ,
initialized to ``inner_lr`` and learned with θ (its sign too: α also picks the
update direction). α is part of the meta-parameters (``inner_lr.<name>``), so it
is checkpointed, shipped to workers and exported with θ; evaluation adapts with
it. Everything else is MAML's (``learners.algorithms.maml``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeInt

from learners.algorithms.maml import MAML
from learners.inner_update import InnerUpdate
from learners.registry import AlgorithmConfig, Parts, register


@register
class MetaSGDConfig(AlgorithmConfig):
    """Meta-SGD: learned per-parameter inner step sizes (initialized to inner_lr)."""

    name: Literal["metasgd"] = "metasgd"
    inner_steps: NonNegativeInt = 1
    """Inner steps (the paper uses one); every step uses the same learned α."""
    first_order: bool = False
    """Detach inner gradients (α still gets its gradient, -∇L_support · ∂L_query/∂φ)."""

    def build(self, parts: Parts) -> MAML:
        return MAML(parts.model, parts.objective, self.inner_steps, self.inner_lr, first_order=self.first_order,
                    strategy=parts.strategy, name=self.name, update=InnerUpdate(self.inner_lr, "per_parameter"))

    def check(self, cfg) -> list[str]:
        if cfg.eval.inner_lr is not None:
            return ["eval.inner_lr: metasgd adapts with its learned per-parameter rates at evaluation; "
                    "leave eval.inner_lr out"]
        return []
