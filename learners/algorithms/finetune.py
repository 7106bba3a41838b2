"""The non-meta-learning baselines of the MAML paper: transfer (pre-train, then fine-tune) and scratch.

Transfer pre-trains one model on the pooled data of all tasks (each task's
support and query points at θ, no adaptation), then fine-tunes it with SGD on
a new task's support set at test time. It is for sine regression: image episodes
shuffle their labels, so pooling them teaches nothing, and the config refuses it
there (the image baseline is ``pretrain``, ``learners.algorithms.pretrain``). Scratch never pre-trains: the same
fine-tuning starts from the initialization, i.e. training on the support set
only. Evaluation and fine-tuning are MAML's (all parameters, SGD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import grad

from learners.algorithms.maml import MAML
from learners.objective import after_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register


@dataclass
class Transfer(MAML):
    first_order: bool = True
    name: str = "transfer"

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        grads = grad(lambda p: self.objective.loss(self.predict(p, x), y))(params)
        with torch.no_grad():
            pred = self.predict(params, qx)
        # No adaptation happens while pre-training, so only the "before" statistics exist.
        return grads, after_stats(self.objective, pred, qy, "before")


@dataclass
class Scratch(Transfer):
    """Never meta-trained (the config requires outer.steps: 0): evaluation fine-tunes the initialization."""

    name: str = "scratch"


@register
class BaselineConfig(AlgorithmConfig):
    """transfer: pre-train on the pooled tasks, then fine-tune; scratch: fine-tune the initialization only."""

    name: Literal["transfer", "scratch"] = "transfer"

    def build(self, parts: Parts) -> Transfer:
        return (Scratch if self.name == "scratch" else Transfer)(parts.model, parts.objective, inner_lr=self.inner_lr,
                                                                  strategy=parts.strategy)

    def check(self, cfg) -> list[str]:
        if self.name == "transfer" and cfg.task.family == "images":
            # Each image episode shuffles its labels: pooled episodes teach labels that mean nothing across them.
            return ["algorithm.name: transfer pre-trains on each episode's own labels, which are shuffled per image "
                    "episode; for images use algorithm.name: pretrain (a classifier over the training classes' "
                    "global labels, then a solver on the frozen embedding)"]
        if self.name == "scratch" and cfg.outer.steps:
            return ["outer.steps: scratch trains nothing before fine-tuning; set outer.steps: 0"]
        return []
