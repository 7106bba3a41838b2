"""Validation while training, and model selection: the checkpoint the final test score is reported on.

Every ``eval.every`` meta-steps, ``eval.val_tasks`` fixed validation episodes (their own seed stream;
image tasks: the classes of ``task.split.val``) are scored on the workers, like training. Their mean
query loss and metrics after ``max(eval.steps)`` adaptation steps, with 95% CIs, are logged as
``val/loss``, ``val/acc`` (...) at the training step, so MLflow draws validation curves. The best
checkpoint by ``eval.select`` is kept in ``best.pt`` (written atomically), the final test evaluation
runs on it as the papers report, and ``eval.patience`` optionally stops training early.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from orchestrator.config import Config
from orchestrator.run.evaluation import summarize
from orchestrator.workers.group import Group
from tasks.episode import EpisodeIds, Purpose

BEST = "best.pt"


def validate(cfg: Config, group: Group, theta: np.ndarray) -> dict[str, float]:
    """``{"val/loss": ..., "val/loss_ci95": ..., "val/acc": ...}`` of ``theta`` on the validation episodes."""
    e = cfg.eval
    ids = EpisodeIds(e.seed, 0, tuple(range(e.val_tasks)), Purpose.VAL)
    steps = max(e.steps)
    parts = group.evaluate(theta, ids.split(math.ceil(e.val_tasks / e.batch_tasks)), steps,
                           e.inner_lr or cfg.algorithm.inner_lr, None, "val")
    curves = {metric: np.concatenate([p[metric] for p in parts]) for metric in parts[0]}
    out = {}
    for metric, by_step in summarize(curves, [steps]).items():  # diverged tasks are left out, as in evaluation
        s = by_step[steps]
        out[f"val/{metric}"], out[f"val/{metric}_ci95"] = s.mean, s.ci95
    return out


class ModelSelection:
    """The best validation score so far, where it was reached, and how many validations since."""

    def __init__(self, metric: str, patience: int | None):
        self.key = f"val/{metric}"
        self.higher_is_better = metric != "loss"
        self.patience = patience
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.since_best = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record a validation at ``step``; True when it is the best so far (a NaN never is)."""
        value = metrics[self.key]
        better = math.isfinite(value) and (self.best_value is None or (
            value > self.best_value if self.higher_is_better else value < self.best_value))
        if better:
            self.best_step, self.best_value, self.since_best = step, value, 0
        else:
            self.since_best += 1
        return better

    @property
    def exhausted(self) -> bool:
        """Early stopping: ``patience`` validations in a row without improvement."""
        return self.patience is not None and self.since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_value": self.best_value, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.since_best = int(state["since_best"])


def selection_for(cfg: Config, metric_names: tuple[str, ...]) -> ModelSelection | None:
    """The run's model selection (None without validation); ``auto`` picks accuracy where the objective has it."""
    e = cfg.eval
    if not e.every:
        return None
    metric = e.select if e.select != "auto" else ("acc" if "acc" in metric_names else "loss")
    return ModelSelection(metric, e.patience)
