"""From a validated config to the objects a learner or worker runs: task source, model, algorithm.

Workers and the central learner build identical objects from the same config here. Algorithms
build themselves from their config variant (``learners.registry``); this module only resolves
what they are built from (``Parts``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from learners.algorithm import Algorithm
from learners.classifier import Classifier
from learners.conv4 import Conv4
from learners.mlp import MLP
from learners.objective import MSE, CrossEntropy, Objective
from learners.registry import Parts
from learners.resnet12 import ResNet12
from orchestrator.config import Config, ConfigError, ImageTaskConfig, SineTaskConfig, TaskConfig
from tasks.episode import TaskSource
from tasks.sine import SineTasks

# Per-task strategy when algorithm.strategy is "auto", by backbone, measured on this project's 2-core CPU
# (benchmarks/throughput.py): vmap ~10x faster than a loop for the sine MLP; a loop 1.5-2x faster than
# vmap for Conv-4 (ProtoNet, FOMAML, ANIL, MAML alike).
AUTO_STRATEGY = {"mlp": "vmap", "conv4": "loop", "resnet12": "loop"}

Split = Literal["train", "val", "eval"]


def build_tasks(task: TaskConfig, split: Split = "train") -> TaskSource:
    """Episodes of ``split``: the classes meta-training may see, the validation classes, or the held-out
    ones of the final evaluation (``task.eval_split``) (images; sine tasks have one distribution)."""
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
        name = task.eval_split if split == "eval" else split
        return FewShotTasks(store, task.n_way, task.k_shot, task.query, getattr(classes, name), rotations=task.rotations)
    raise ValueError(f"no task source for family {task.family!r}")


def build_model(cfg: Config) -> tuple[nn.Module, Objective, int]:
    """The task model (structure only, on the meta device), its objective, and its input width."""
    with torch.device("meta"):
        if isinstance(cfg.task, SineTaskConfig):
            return MLP(1, list(cfg.model.hidden), 1), MSE(), 1
        from tasks.store import ImageStore

        shape = ImageStore.open(cfg.task.store).image_shape
        channels, height, _ = shape
        if height < 16:
            raise ConfigError(f"model.backbone: {cfg.model.backbone} pools 4 times and needs images of at least "
                              f"16x16; {cfg.task.store} holds {height}x{height} (convert with --size 28 or more)")
        if cfg.model.backbone == "resnet12":
            net = ResNet12(channels)
            model = Classifier(net, net.out_features(shape), cfg.task.n_way)
        else:
            model = Conv4(channels, height, cfg.task.n_way, cfg.model.width)
        return model, CrossEntropy(), channels * height * height


def build_algorithm(cfg: Config) -> Algorithm:
    model, objective, in_features = build_model(cfg)
    a = cfg.algorithm
    strategy = AUTO_STRATEGY[cfg.model.backbone] if a.strategy == "auto" else a.strategy
    n_way = cfg.task.n_way if isinstance(cfg.task, ImageTaskConfig) else None
    return a.build(Parts(model, objective, in_features, n_way, strategy))
