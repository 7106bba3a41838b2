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


class MSE:
    """Mean squared error (regression)."""

    metric_names: tuple[str, ...] = ()

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((pred - y) ** 2).mean()

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class CrossEntropy:
    """Cross-entropy over class logits; reports accuracy."""

    metric_names: tuple[str, ...] = ("acc",)

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred, y)

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (pred.argmax(-1) == y).to(pred.dtype).mean()}


def after_stats(objective: Objective, pred: torch.Tensor, y: torch.Tensor, when: str = "after") -> dict[str, torch.Tensor]:
    """Query loss and metrics of one task's predictions, detached, named ``loss_after``, ``acc_after``, ..."""
    pred = pred.detach()
    return {f"{k}_{when}": v for k, v in {"loss": objective.loss(pred, y), **objective.metrics(pred, y)}.items()}


def query_stats(objective: Objective, pred_before: torch.Tensor, pred_after: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Query loss (and metrics) of one task before and after adaptation, detached."""
    return {**after_stats(objective, pred_before, y, "before"), **after_stats(objective, pred_after, y)}
