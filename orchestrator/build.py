"""From a validated config to the objects a learner or worker runs: task source, model, algorithm.

The one place where config names meet classes, so workers and the central
learner build identical algorithms from the same config.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from learners.algorithm import Algorithm
from learners.conv4 import Conv4
from learners.finetune import Scratch, Transfer
from learners.hypernet import HyperNetwork
from learners.maml import MAML
from learners.mlp import MLP
from learners.objective import MSE, CrossEntropy, Objective
from learners.protonet import ProtoNet
from learners.reptile import Reptile
from orchestrator.config import Config, ImageTaskConfig, SineTaskConfig, TaskConfig
from tasks.episode import TaskSource
from tasks.sine import SineTasks

# Per-task strategy when algorithm.strategy is "auto", keyed by (backbone, second order), measured on this
# project's 2-core CPU (benchmarks/throughput.py).
AUTO_STRATEGY = {("mlp", False): "vmap", ("mlp", True): "vmap", ("conv4", False): "loop", ("conv4", True): "loop"}

Split = Literal["train", "eval"]


def build_tasks(task: TaskConfig, split: Split = "train") -> TaskSource:
    """Episodes of ``split``: the classes meta-training may see, or the held-out ones (images)."""
    if isinstance(task, SineTaskConfig):
        return SineTasks(**task.model_dump(exclude={"family"}))
    if isinstance(task, ImageTaskConfig):
        # Imported here so sine runs never load pyarrow.
        from tasks.fewshot import FewShotTasks
        from tasks.splits import split_classes
        from tasks.store import ImageStore

        store = ImageStore.open(task.store)
        s = task.split
        classes = split_classes(store, by=s.by, train=s.train, val=s.val, test=s.test, seed=s.seed)
        name = "train" if split == "train" else task.eval_split
        return FewShotTasks(store, task.n_way, task.k_shot, task.query, getattr(classes, name), rotations=task.rotations)
    raise ValueError(f"no task source for family {task.family!r}")


def build_model(cfg: Config) -> tuple[nn.Module, Objective, int]:
    """The task model (structure only, on the meta device), its objective, and its input width."""
    with torch.device("meta"):
        if isinstance(cfg.task, SineTaskConfig):
            return MLP(1, list(cfg.model.hidden), 1), MSE(), 1
        from tasks.store import ImageStore

        channels, height, _ = ImageStore.open(cfg.task.store).image_shape
        return Conv4(channels, height, cfg.task.n_way, cfg.model.width), CrossEntropy(), channels * height * height


def _second_order(cfg: Config) -> bool:
    return cfg.algorithm.name in ("maml", "anil") and not cfg.algorithm.first_order


def build_algorithm(cfg: Config) -> Algorithm:
    model, objective, in_features = build_model(cfg)
    a = cfg.algorithm
    strategy = AUTO_STRATEGY[(cfg.model.backbone, _second_order(cfg))] if a.strategy == "auto" else a.strategy
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
    if a.name == "protonet":
        return ProtoNet(model, objective, n_way=cfg.task.n_way, strategy=strategy)
    if a.name == "hypernet":
        # The task model's output joins its input in each support pair the DeepSet reads.
        return HyperNetwork(model, objective, in_features=in_features + 1, width=a.hyper_width, strategy=strategy)
    raise ValueError(f"unknown algorithm {a.name!r}")
