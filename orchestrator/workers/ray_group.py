"""The Ray worker group: a run's TaskWorker actors behind the ``group.Group`` interface.

One meta-step reads straight down and back: ``WorkerGroup.meta_gradient`` sends θ (a small θ inline in each
call, a large one put in the object store once), describes each share's call as a ``ShareCall``, and hands
the list to the ``ShareScheduler``, which gives each to a free actor of the ``ActorPool`` and returns the
results in share order; ``messages.aggregate`` sums them. With ``reduce: node`` the gradients stay on their
nodes and a ``NodeReducer`` per node sums them first, so the learner receives one float64 partial sum per node.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config import Config
from orchestrator.workers.actor_pool import ActorPool
from orchestrator.workers.messages import (
    Aggregate,
    CallTiming,
    ShareCall,
    aggregate,
    ids_message,
    sum_grads,
    theta_message,
)
from orchestrator.workers.ray_session import RaySession
from orchestrator.workers.share_scheduler import ShareScheduler
from tasks.episode import EpisodeIds


class WorkerGroup:
    """The TaskWorker actors of a run, behind the same interface as ``group.LocalGroup``."""

    def __init__(self, cfg: Config):
        self._w = cfg.workers
        self.session = RaySession(cfg)
        self.pool = None
        self._reducers: dict[str, Any] = {}  # node id -> NodeReducer actor (reduce: node)
        try:
            self.pool = ActorPool(cfg, self.session)
        except BaseException:
            self.close()
            raise
        self.scheduler = ShareScheduler(self.pool, self._w.straggler_deadline_s)
        self.faults = self.pool.faults

    @property
    def size(self) -> int:
        return self.pool.size

    def meta_gradient(self, theta: np.ndarray, shares: list[EpisodeIds]) -> Aggregate:
        """The step's mean meta-gradient over ``shares``; summed node by node first when ``reduce: node``."""
        start = time.perf_counter()
        theta_arg = self._send(theta)
        put_s = time.perf_counter() - start
        what = f"the meta-gradient of step {shares[0].step}"
        if self._w.reduce == "flat":
            return self._flat(theta_arg, shares, what, put_s)
        # meta_gradient_parts: the scheduler waits for the header; the gradient's ref stays on the worker's node.
        done = self.scheduler.run([ShareCall("meta_gradient_parts", (theta_arg, ids_message(s)), returns=2) for s in shares], what)
        reduce_start = time.perf_counter()
        by_node: dict[str, list[Any]] = {}
        for r in done.results:
            by_node.setdefault(r.value.node, []).append(r.payload)
        try:
            partials = ray.get([self._reducer(node).sum.remote(*refs) for node, refs in sorted(by_node.items())])
        except ray.exceptions.RayError as e:
            # A node died after computing: its gradients went with its object store. Recompute them all flat.
            self.faults.add(f"node reduction failed ({type(e).__name__}); recomputing the step's shares")
            for node in by_node:
                reducer = self._reducers.pop(node, None)
                if reducer is not None:
                    ray.kill(reducer, no_restart=True)
            return self._flat(theta_arg, shares, what, put_s, spent_s=time.perf_counter() - start - put_s)
        wait_s = done.wait_s + time.perf_counter() - reduce_start
        return aggregate([r.value for r in done.results], partials,
                         CallTiming(put_s, wait_s, sum(p.nbytes for p in partials)))

    def _flat(self, theta_arg: Any, shares: list[EpisodeIds], what: str, put_s: float, spent_s: float = 0.0
              ) -> Aggregate:
        """Every share's gradient to the learner (``spent_s``: time already spent on this step's shares)."""
        done = self.scheduler.run([ShareCall("meta_gradient", (theta_arg, ids_message(s))) for s in shares], what)
        results = [r.value for r in done.results]
        return aggregate(results, timing=CallTiming(put_s, spent_s + done.wait_s, sum(r.grad.nbytes for r in results)))

    def evaluate(self, theta: np.ndarray, shares: list[EpisodeIds], steps: int, lr: float,
                 probe: str | None = None, split: str = "eval") -> list[dict[str, np.ndarray]]:
        theta_arg = self._send(theta)
        calls = [ShareCall("evaluate", (theta_arg, ids_message(s), steps, lr, probe, split)) for s in shares]
        return [r.value.curves for r in self.scheduler.run(calls, "evaluation").results]

    def _send(self, theta: np.ndarray) -> Any:
        """What the calls pass as θ: bytes inside each call when small, else one object-store ref read by all."""
        message = theta_message(theta)
        return message if isinstance(message, bytes) else ray.put(theta)

    def _reducer(self, node: str) -> Any:
        if node not in self._reducers:
            self._reducers[node] = ray.remote(NodeReducer).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return self._reducers[node]

    def maintain(self) -> None:
        self.pool.maintain()

    def resources(self) -> dict[str, Any]:
        return {"resources.workers": self.size, **self.session.resources()}

    def node_ids(self) -> list[str]:
        return self.pool.node_ids()

    def learner_threads(self) -> int:
        """Torch threads for the learner's process: the cores of its node that the workers there do not take,
        at least one. The learner only steps the optimizer and sums gradients; an OpenMP team larger than the
        free cores waits at every parallel op for the thread a worker preempted (measured on a busy 2-core
        machine: fused Adam on sine's θ 0.07 ms with one thread, 0.14 ms median and 31 ms p90 with two)."""
        here = ray.get_runtime_context().get_node_id()
        taken = math.ceil(sum(node == here for node in self.node_ids()) * self._w.num_cpus)
        return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - taken))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for r in self._reducers.values():
            ray.kill(r, no_restart=True)
        self._reducers = {}
        self.session.close()


class NodeReducer:
    """Sums the gradients that workers on its node left in the node's object store (zero-copy reads)."""

    def sum(self, *grads: np.ndarray) -> np.ndarray:
        return sum_grads(list(grads))
