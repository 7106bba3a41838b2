"""Algorithms whose task model is a meta-learned embedding plus a linear head written from the support set.

ProtoNet (prototypes) and MetaOptNet (a solved SVM or ridge fit) differ only in how the head
is written (``start``); the rest is shared here: the meta-parameters are the embedding's (no head),
adaptation is writing the head, and test-time fine-tuning tunes that head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from learners.models.classifier import Classifier
from learners.objective import Objective
from learners.params import Params, init_params


@dataclass
class SupportHead:
    model: Classifier
    objective: Objective
    n_way: int

    def init_params(self, seed: int) -> Params:
        return {k: v for k, v in init_params(self.model, seed).items() if k not in self.model.head_keys}

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """The task model: ``params`` plus the head written from the support set."""
        raise NotImplementedError

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.start(params, support_x, support_y)

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        return self.model.head_keys

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, task_params, (x,))
