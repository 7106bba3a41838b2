"""Task objectives: the loss a task is fitted with and the metrics reported on its query set."""

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
