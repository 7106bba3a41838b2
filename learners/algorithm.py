"""The contract every meta-learning algorithm meets (docs/design.md, "Algorithms are pure in θ").

An algorithm is pure with respect to the meta-parameters: parameters in,
new parameters or gradients out, never mutated.
"""

from __future__ import annotations

from typing import Protocol

import torch

from learners.objective import Objective
from learners.params import Params
from learners.strategy import Strategy, Summed
from tasks.episode import EpisodeBatch


class Algorithm(Protocol):
    name: str
    objective: Objective
    strategy: Strategy

    def init_params(self, seed: int) -> Params:
        """Initial meta-parameters, a deterministic function of ``seed``."""
        ...

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """The inner loop on one task's support set: the task-specific parameters it produces."""
        ...

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """The task model before any test-time gradient step (θ itself for MAML; generated weights for a
        hypernetwork). ``learners.inner_loop.adaptation_curves`` fine-tunes it to score the algorithm."""
        ...

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        """The entries of the task model that adaptation steps change (ANIL: the head)."""
        ...

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the task model with ``task_params`` (from ``adapt``) at inputs ``x``."""
        ...

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        """SUM over the episodes of each task's meta-gradient, plus summed query statistics."""
        ...


class StepDependent(Protocol):
    """Optional: an algorithm whose settings follow the meta-step (MAML++'s annealed multi-step loss and
    derivative order). The worker calls ``for_step`` before each ``meta_gradient`` when an algorithm has it."""

    def for_step(self, step: int) -> Algorithm:
        """The algorithm as configured for meta-step ``step``: a configured copy (or itself), never a mutation."""
        ...


class Prepared(Protocol):
    """Optional: an algorithm whose test-time task models need a statistic of θ shared by every task (the
    pre-trained embedding's mean training feature). ``learners.inner_loop.adaptation_curves`` calls ``prepare``
    once per batch of episodes, before ``start``."""

    def prepare(self, params: Params) -> Params:
        """``params`` plus the shared entries ``start`` reads (new entries; θ's own are unchanged)."""
        ...
