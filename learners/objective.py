"""Task objectives: the loss a task is fitted with, the metrics reported on its query set, and the
per-task statistics (before/after adaptation) every algorithm returns with its meta-gradient."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    metric_names: tuple[str, ...]

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]: ...

    # Optional, for task-batched predictions [T, N, ...] (learners.algorithms.maml_batched): ``loss`` and ``metrics`` of
    # each task, [T] each. task_losses(pred, y) -> Tensor; task_metrics(pred, y) -> dict[str, Tensor].


class MSE:
    """Mean squared error (regression)."""

    metric_names: tuple[str, ...] = ()

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((pred - y) ** 2).mean()

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def task_losses(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss`` of each task of task-batched predictions ``[T, N, ...]``: ``[T]``."""
        return ((pred - y) ** 2).flatten(1).mean(1)

    def task_metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class CrossEntropy:
    """Cross-entropy over class logits; reports accuracy."""

    metric_names: tuple[str, ...] = ("acc",)

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred, y)

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (pred.argmax(-1) == y).to(_stat_dtype(pred)).mean()}

    def task_losses(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss`` of each task of task-batched logits ``[T, N, C]`` and labels ``[T, N]``: ``[T]``."""
        return F.cross_entropy(pred.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)

    def task_metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (pred.argmax(-1) == y).to(_stat_dtype(pred)).mean(1)}


def _stat_dtype(pred: torch.Tensor) -> torch.dtype:
    # At least float32: a mean of 0/1 over 75 queries in bfloat16 (mixed precision) is off by ~1e-2.
    return torch.promote_types(pred.dtype, torch.float32)


def after_stats(objective: Objective, pred: torch.Tensor, y: torch.Tensor, when: str = "after") -> dict[str, torch.Tensor]:
    """Query loss and metrics of one task's predictions, detached, named ``loss_after``, ``acc_after``, ..."""
    pred = pred.detach()
    return {f"{k}_{when}": v for k, v in {"loss": objective.loss(pred, y), **objective.metrics(pred, y)}.items()}


def query_stats(objective: Objective, pred_before: torch.Tensor, pred_after: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Query loss (and metrics) of one task before and after adaptation, detached."""
    return {**after_stats(objective, pred_before, y, "before"), **after_stats(objective, pred_after, y)}
