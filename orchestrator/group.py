"""Worker groups: who computes the shares of a meta-step.

``WorkerGroup`` owns the TaskWorker Ray actors: it starts them (resources from
config), broadcasts θ once per call through the object store, dispatches one
share per worker, and re-dispatches a share whose worker died to another worker
(actors restart themselves, ``max_restarts=-1``). Ray never retries a task by
itself (``max_task_retries=0``): the group decides, which keeps every share
computed exactly once in the result. Results come back in share order, so the
sum is deterministic. A worker's own exception is re-raised as itself.

``LocalGroup`` runs the same TaskWorker in this process with the same shares:
the reference the Ray path is tested against, and a debugging mode.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import Config
from orchestrator.worker import TaskWorker
from tasks.episode import EpisodeIds

log = logging.getLogger("metaray")


@dataclass
class CallTiming:
    """Where the wall time of one group call went (seconds)."""

    put_s: float = 0.0
    wait_s: float = 0.0  # dispatch + remote compute + fetching results
    total_s: float = 0.0


@dataclass
class FaultLog:
    count: int = 0
    events: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.count += 1
        self.events.append(what)
        log.warning("worker fault %d: %s", self.count, what)


class LocalGroup:
    """The in-process reference: one TaskWorker, the same shares as the Ray group, in order."""

    def __init__(self, cfg: Config):
        self.size = cfg.workers.num_workers
        self.worker = TaskWorker(cfg.model_dump(mode="json"), 0)
        self.faults = FaultLog()
        self.timing = CallTiming()

    def map(self, method: str, theta: np.ndarray, shares: list[EpisodeIds], *args: Any) -> list[Any]:
        start = time.perf_counter()
        out = [getattr(self.worker, method)(theta, share, *args) for share in shares]
        self.timing = CallTiming(0.0, time.perf_counter() - start, time.perf_counter() - start)
        return out

    def close(self) -> None:
        pass


class _RayTaskWorker(TaskWorker):
    def __init__(self, config: dict[str, Any], index: int):
        # A restart re-runs this constructor; fault injection fires only in the first incarnation.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # raised by Ray's own property internals
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        super().__init__(config, index, restarted=restarted)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def connect(cfg: Config) -> bool:
    """Join the configured Ray cluster, or start Ray embedded; True when this call started it."""
    if ray.is_initialized():
        return False
    w = cfg.workers
    if w.address:
        ray.init(address=w.address, logging_level=logging.WARNING, log_to_driver=True)
        return True
    # Embedded: reserve enough logical CPUs for every worker even on a small laptop (they then share cores).
    cpus = max(os.cpu_count() or 1, math.ceil(w.num_workers * w.num_cpus))
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
             _node_ip_address="127.0.0.1")
    return True


class WorkerGroup:
    """Owns the TaskWorker actors of a run."""

    def __init__(self, cfg: Config):
        self._started_ray = connect(cfg)
        w = cfg.workers
        self._actor_cls = ray.remote(_RayTaskWorker).options(
            num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=w.max_restarts, max_task_retries=0
        )
        self._config = cfg.model_dump(mode="json")
        self.actors = [self._actor_cls.remote(self._config, i) for i in range(w.num_workers)]
        self.faults = FaultLog()
        self.timing = CallTiming()
        self._incarnation: list[str | None] = [None] * len(self.actors)
        self._restart_counted = [False] * len(self.actors)
        for i, ref in enumerate([a.ready.remote() for a in self.actors]):
            try:
                self._incarnation[i] = ray.get(ref)
            except RayActorError as e:
                self.close()
                raise RuntimeError(f"worker {i} failed to start: {_actor_cause(e)}") from None

    @property
    def size(self) -> int:
        return len(self.actors)

    def map(self, method: str, theta: np.ndarray, shares: list[EpisodeIds], *args: Any) -> list[Any]:
        """Run ``method(theta, share, *args)`` for every share on the workers; results in share order."""
        start = time.perf_counter()
        theta_ref = ray.put(theta)
        put_s = time.perf_counter() - start
        pending: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # ref -> (share, worker, attempt)

        def dispatch(share: int, worker: int, attempt: int) -> None:
            actor = self.actors[worker]
            pending[getattr(actor, method).remote(theta_ref, shares[share], *args)] = (share, worker, attempt)

        for k in range(len(shares)):
            dispatch(k, k % self.size, 0)
        results: list[Any] = [None] * len(shares)
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            share, worker, attempt = pending.pop(done)
            try:
                results[share] = ray.get(done)
            except RayTaskError as e:
                raise e.as_instanceof_cause() from None  # the worker's own error, not Ray's wrapper
            except RayActorError as e:
                self.faults.add(f"worker {worker} died during {method} of step {shares[share].step} "
                                f"(share {share}): {type(e).__name__}")
                self._restart_counted[worker] = True
                if attempt + 1 >= 3 * self.size:
                    raise RuntimeError(f"share {share} of step {shares[share].step} failed on {attempt + 1} "
                                       f"attempts; last error: {_actor_cause(e)}") from None
                dispatch(share, (worker + 1 + attempt) % self.size, attempt + 1)
                continue
            self._note_incarnation(worker, getattr(results[share], "incarnation", None))
        self.timing = CallTiming(put_s, time.perf_counter() - start - put_s, time.perf_counter() - start)
        return results

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def _note_incarnation(self, worker: int, incarnation: str | None) -> None:
        # An actor killed between calls restarts silently; a new incarnation id is how we notice.
        if incarnation is None or incarnation == self._incarnation[worker]:
            return
        if not self._restart_counted[worker]:
            self.faults.add(f"worker {worker} was restarted")
        self._incarnation[worker] = incarnation
        self._restart_counted[worker] = False

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()


def _actor_cause(e: RayActorError) -> str:
    text = str(e)
    # Ray's message carries the constructor's traceback; its last non-empty line names the original error.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def make_group(cfg: Config) -> LocalGroup | WorkerGroup:
    return WorkerGroup(cfg) if cfg.workers.mode == "ray" else LocalGroup(cfg)
