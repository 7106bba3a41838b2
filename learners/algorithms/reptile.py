"""Reptile (Nichol et al. 2018): the meta-gradient of a task is θ − φ, φ = θ after k SGD steps on it.

Fed to an outer SGD optimizer with learning rate ε this is the Reptile update
θ ← θ + ε · mean(φ − θ); with Adam it is the variant used in the paper's
few-shot experiments. Adaptation and evaluation are MAML's (first order, all
parameters); only the per-task meta-gradient differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import NonNegativeInt

from learners.algorithms.maml import MAML
from learners.objective import query_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register


@dataclass
class Reptile(MAML):
    inner_steps: int = 5
    first_order: bool = True
    name: str = "reptile"

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        fast = self.adapt(params, sx, sy)
        delta = {k: (params[k] - fast[k]).detach() for k in params}
        with torch.no_grad():
            stats = query_stats(self.objective, self.predict(params, qx), self.predict(fast, qx), qy)
        return delta, stats


@register
class ReptileConfig(AlgorithmConfig):
    name: Literal["reptile"] = "reptile"
    inner_steps: NonNegativeInt = 5
    """SGD steps on the support set; the meta-gradient is θ minus where they end."""

    def build(self, parts: Parts) -> Reptile:
        return Reptile(parts.model, parts.objective, self.inner_steps, self.inner_lr, strategy=parts.strategy)
