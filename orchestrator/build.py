"""From a validated config to the objects a learner or worker runs: task source, model, algorithm.

The one place where config names meet classes, so workers and the central
learner build identical algorithms from the same config.
"""

from __future__ import annotations

import torch
from torch import nn

from learners.algorithm import Algorithm
from learners.finetune import Scratch, Transfer
from learners.hypernet import HyperNetwork
from learners.maml import MAML
from learners.mlp import MLP
from learners.objective import MSE, Objective
from learners.reptile import Reptile
from orchestrator.config import Config, SineTaskConfig, TaskConfig
from tasks.episode import TaskSource
from tasks.sine import SineTasks

# Per-task strategy by backbone when algorithm.strategy is "auto", from benchmarks/sine_throughput.py
# on a 2-core CPU: vmap over tasks was ~13x faster than a Python loop for the sine MLP (MAML, 25 tasks).
AUTO_STRATEGY = {"mlp": "vmap"}


def build_tasks(task: TaskConfig) -> TaskSource:
    if isinstance(task, SineTaskConfig):
        fields = task.model_dump(exclude={"family"})
        return SineTasks(**fields)
    raise ValueError(f"no task source for family {task.family!r}")


def build_model(cfg: Config) -> tuple[nn.Module, Objective, int]:
    """The task model (structure only, on the meta device), its objective, and its input width."""
    if isinstance(cfg.task, SineTaskConfig) and cfg.model.backbone == "mlp":
        with torch.device("meta"):
            return MLP(1, list(cfg.model.hidden), 1), MSE(), 1
    raise ValueError(f"backbone {cfg.model.backbone!r} does not fit task family {cfg.task.family!r}")


def build_algorithm(cfg: Config) -> Algorithm:
    model, objective, in_features = build_model(cfg)
    a = cfg.algorithm
    strategy = AUTO_STRATEGY[cfg.model.backbone] if a.strategy == "auto" else a.strategy
    common = dict(model=model, objective=objective, inner_steps=a.inner_steps, inner_lr=a.inner_lr, strategy=strategy)
    if a.name in ("maml", "fomaml"):
        return MAML(**common, first_order=a.first_order or a.name == "fomaml", name=a.name)
    if a.name == "anil":
        return MAML(**common, first_order=a.first_order, inner_keys=model.head_keys, name="anil")
    if a.name == "reptile":
        return Reptile(**common)
    if a.name == "transfer":
        return Transfer(**common)
    if a.name == "scratch":
        return Scratch(**common)
    if a.name == "hypernet":
        # The task model's output joins its input in each support pair the DeepSet reads.
        return HyperNetwork(model, objective, in_features=in_features + 1, width=a.hyper_width, strategy=strategy)
    raise ValueError(f"unknown algorithm {a.name!r}")
