"""The contract every meta-learning algorithm meets (see DESIGN.md, "Algorithm").

An algorithm is pure with respect to the meta-parameters: parameters in,
new parameters or gradients out, never mutated.
"""

from __future__ import annotations

from typing import Protocol

import torch

from learners.params import Params
from learners.strategy import Summed
from tasks.episode import EpisodeBatch


class Algorithm(Protocol):
    name: str
    #: False for baselines that never meta-train (training from scratch).
    trains: bool

    def init_params(self, seed: int) -> Params:
        """Initial meta-parameters, a deterministic function of ``seed``."""
        ...

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """The inner loop on one task's support set: the task-specific parameters it produces."""
        ...

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the task model with ``task_params`` (from ``adapt``) at inputs ``x``."""
        ...

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        """SUM over the episodes of each task's meta-gradient, plus summed query statistics."""
        ...

    def evaluate(self, params: Params, batch: EpisodeBatch, steps: int, lr: float) -> dict[str, torch.Tensor]:
        """Per-task query loss (and metrics) after 0..``steps`` adaptation steps: ``[T, steps + 1]`` each."""
        ...
