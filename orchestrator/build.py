"""From a validated config to the objects a learner or worker runs: task source, model, algorithm.

The one place where config names meet classes, so workers and the central
learner build identical algorithms from the same config.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from learners.algorithm import Algorithm
from learners.classifier import Classifier
from learners.conv4 import Conv4
from learners.finetune import Scratch, Transfer
from learners.hypernet import HyperNetwork
from learners.maml import MAML
from learners.metaoptnet import MetaOptNet
from learners.mlp import MLP
from learners.objective import MSE, CrossEntropy, Objective
from learners.protonet import ProtoNet
from learners.reptile import Reptile
from learners.resnet12 import ResNet12
from orchestrator.config import Config, ConfigError, ImageTaskConfig, SineTaskConfig, TaskConfig
from tasks.episode import TaskSource
from tasks.sine import SineTasks

# Per-task strategy when algorithm.strategy is "auto", by backbone, measured on this project's 2-core CPU
# (benchmarks/throughput.py): vmap ~10x faster than a loop for the sine MLP; a loop 1.5-2x faster than
# vmap for Conv-4 (ProtoNet, FOMAML, ANIL, MAML alike).
AUTO_STRATEGY = {"mlp": "vmap", "conv4": "loop", "resnet12": "loop"}

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

        shape = ImageStore.open(cfg.task.store).image_shape
        channels, height, _ = shape
        if height < 16:
            raise ConfigError(f"model.backbone: {cfg.model.backbone} pools 4 times and needs images of at least "
                              f"16x16; {cfg.task.store} holds {height}x{height} (convert with --size 28 or more)")
        if cfg.model.backbone == "resnet12":
            # DropBlock stays off: its masks would come from a process-local generator, not from the episode,
            # and distributed steps would no longer be exact.
            net = ResNet12(channels)
            model = Classifier(net, net.out_features(shape), cfg.task.n_way)
        else:
            model = Conv4(channels, height, cfg.task.n_way, cfg.model.width)
        return model, CrossEntropy(), channels * height * height


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
    if a.name == "protonet":
        return ProtoNet(model, objective, n_way=cfg.task.n_way, strategy=strategy)
    if a.name.startswith("metaoptnet"):
        return MetaOptNet(model, objective, n_way=cfg.task.n_way, head=a.name.split("-")[1], solver=a.solver,
                          C=a.svm_c, lam=a.ridge_lambda, train_iters=a.solver_iters, eval_iters=a.eval_solver_iters,
                          label_smoothing=a.label_smoothing, strategy=strategy, name=a.name)
    if a.name == "hypernet":
        # The task model's output joins its input in each support pair the DeepSet reads.
        return HyperNetwork(model, objective, in_features=in_features + 1, width=a.hyper_width, strategy=strategy)
    raise ValueError(f"unknown algorithm {a.name!r}")
