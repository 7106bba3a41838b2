"""The messages between the central learner and its workers, and the pure reduction of their results.

Learner -> worker: flat float32 θ (one object-store ref per step) and ``EpisodeIds``.
Worker -> learner: ``TaskResult``, the summed meta-gradient of its share.
``aggregate`` turns the results of one step into the mean meta-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TaskResult:
    """One worker's share of a meta-step: sums over its kept tasks."""

    grad: np.ndarray  # flat float32, SUM over kept tasks
    stats: dict[str, float]  # SUMS over kept tasks, e.g. loss_before, loss_after, acc_after
    tasks: int  # kept tasks
    dropped: int  # tasks dropped for non-finite values
    compute_s: float = 0.0
    worker: int = 0
    incarnation: str = ""  # changes when the actor process is restarted


@dataclass(frozen=True)
class Aggregate:
    grad: np.ndarray | None  # mean over kept tasks; None when every task was dropped
    stats: dict[str, float]  # means over kept tasks
    tasks: int
    dropped: int
    compute_s: float = 0.0
    per_worker_tasks: list[int] = field(default_factory=list)


def aggregate(results: list[TaskResult]) -> Aggregate:
    """Sum the shares in share order (deterministic), then divide by the number of kept tasks."""
    tasks = sum(r.tasks for r in results)
    dropped = sum(r.dropped for r in results)
    compute_s = max((r.compute_s for r in results), default=0.0)
    if tasks == 0:
        return Aggregate(None, {}, 0, dropped, compute_s, [r.tasks for r in results])
    total = results[0].grad.copy()
    for r in results[1:]:
        total += r.grad
    keys = sorted({k for r in results for k in r.stats})
    stats = {k: sum(r.stats.get(k, 0.0) for r in results) / tasks for k in keys}
    return Aggregate(total / np.float32(tasks), stats, tasks, dropped, compute_s, [r.tasks for r in results])
