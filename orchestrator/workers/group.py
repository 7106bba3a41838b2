"""Worker groups: who computes the shares of a meta-step, and of an evaluation.

``make_group`` gives the run's group: the Ray ``ray_group.WorkerGroup`` (TaskWorker actors) or ``LocalGroup``,
the same TaskWorker in this process with the same shares: the reference the Ray path is tested against, and a
debugging mode. Both have the interface of ``Group`` and return the same types.

The number of shares is fixed by config, not by the workers alive, and results are summed in
share order: a step's result does not depend on which worker computed what.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import torch

from orchestrator.config import Config
from orchestrator.workers.faults import FaultLog
from orchestrator.workers.messages import Aggregate, CallTiming, aggregate
from orchestrator.workers.worker import TaskWorker
from tasks.episode import EpisodeIds


class Group(Protocol):
    """What the central learner, validation and evaluation use of a worker group."""

    faults: FaultLog

    @property
    def size(self) -> int: ...

    def meta_gradient(self, theta: np.ndarray, shares: list[EpisodeIds]) -> Aggregate:
        """The step's mean meta-gradient over ``shares``, summed in share order."""

    def evaluate(self, theta: np.ndarray, shares: list[EpisodeIds], steps: int, lr: float,
                 probe: str | None = None, split: str = "eval") -> list[dict[str, np.ndarray]]:
        """Per-episode curves of each share, in share order."""

    def maintain(self) -> None:
        """At a step boundary: take back restarted workers, drop lost ones, grow."""

    def resources(self) -> dict[str, Any]: ...

    def learner_threads(self) -> int:
        """Torch threads for the learner's process, given where the workers compute."""

    def close(self) -> None: ...


class LocalGroup:
    """The in-process reference: one TaskWorker, the same shares as the Ray group, in order."""

    size = 1

    def __init__(self, cfg: Config):
        self.worker = TaskWorker(cfg.model_dump(mode="json"), 0)
        self.faults = FaultLog()

    def meta_gradient(self, theta: np.ndarray, shares: list[EpisodeIds]) -> Aggregate:
        start = time.perf_counter()
        results = [self.worker.meta_gradient(theta, share) for share in shares]
        return aggregate(results, timing=CallTiming(wait_s=time.perf_counter() - start))

    def evaluate(self, theta: np.ndarray, shares: list[EpisodeIds], steps: int, lr: float,
                 probe: str | None = None, split: str = "eval") -> list[dict[str, np.ndarray]]:
        return [self.worker.evaluate(theta, share, steps, lr, probe, split).curves for share in shares]

    def maintain(self) -> None:
        pass

    def resources(self) -> dict[str, Any]:
        return {"resources.workers": 1}

    def learner_threads(self) -> int:
        return torch.get_num_threads()  # the worker computes in this process: every thread it has

    def close(self) -> None:
        pass


def make_group(cfg: Config) -> Group:
    if cfg.workers.mode != "ray":
        return LocalGroup(cfg)
    # Imported only for Ray runs: the in-process path runs where Ray is not installed (a bare GPU machine).
    from orchestrator.workers.ray_group import WorkerGroup

    return WorkerGroup(cfg)
