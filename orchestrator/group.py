"""Worker groups: who computes the shares of a meta-step, and of an evaluation.

``WorkerGroup`` puts θ in the object store once per call and has the ``ShareScheduler`` run the
shares on the ``ActorPool``'s TaskWorker actors, inside the run's ``RaySession``. With
``reduce: node`` the gradients stay on their nodes and a ``NodeReducer`` per node sums them first,
so the learner receives one float64 partial sum per node.

``LocalGroup`` runs the same TaskWorker in this process with the same shares: the reference the
Ray path is tested against, and a debugging mode. Both return the same types.

The number of shares is fixed by config, not by the workers alive, and results are summed in
share order: a step's result does not depend on which worker computed what.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from orchestrator.config import Config
from orchestrator.faults import FaultLog
from orchestrator.messages import Aggregate, CallTiming, aggregate, sum_grads
from orchestrator.worker import TaskWorker
from tasks.episode import EpisodeIds


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

    def close(self) -> None:
        pass


class WorkerGroup:
    """The TaskWorker actors of a run, behind the same interface as ``LocalGroup``."""

    def __init__(self, cfg: Config):
        import ray  # imported here: the in-process path runs without Ray

        from orchestrator.actor_pool import ActorPool
        from orchestrator.ray_session import RaySession
        from orchestrator.scheduler import ShareScheduler

        self._ray, self._w = ray, cfg.workers
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
        theta_ref = self._ray.put(theta)
        put_s = time.perf_counter() - start
        what = f"the meta-gradient of step {shares[0].step}"
        if self._w.reduce == "flat":
            done = self.scheduler.run(len(shares), lambda actor, i: _call(actor.meta_gradient, theta_ref, shares[i]), what)
            results = [r.value for r in done.results]
            return aggregate(results, timing=CallTiming(put_s, done.wait_s, sum(r.grad.nbytes for r in results)))
        done = self.scheduler.run(len(shares), lambda actor, i: _split(actor, theta_ref, shares[i]), what)
        reduce_start = time.perf_counter()
        by_node: dict[str, list[Any]] = {}
        for r in done.results:
            by_node.setdefault(r.value.node, []).append(r.payload)
        try:
            partials = self._ray.get([self._reducer(node).sum.remote(*refs) for node, refs in sorted(by_node.items())])
        except self._ray.exceptions.RayError as e:
            # A node died after computing: its gradients went with its object store. Recompute them all flat.
            self.faults.add(f"node reduction failed ({type(e).__name__}); recomputing the step's shares")
            for node in by_node:
                reducer = self._reducers.pop(node, None)
                if reducer is not None:
                    self._ray.kill(reducer, no_restart=True)
            flat = self.scheduler.run(len(shares), lambda actor, i: _call(actor.meta_gradient, theta_ref, shares[i]), what)
            results = [r.value for r in flat.results]
            return aggregate(results, timing=CallTiming(put_s, time.perf_counter() - start - put_s,
                                                        sum(r.grad.nbytes for r in results)))
        wait_s = done.wait_s + time.perf_counter() - reduce_start
        return aggregate([r.value for r in done.results], partials,
                         CallTiming(put_s, wait_s, sum(p.nbytes for p in partials)))

    def evaluate(self, theta: np.ndarray, shares: list[EpisodeIds], steps: int, lr: float,
                 probe: str | None = None, split: str = "eval") -> list[dict[str, np.ndarray]]:
        theta_ref = self._ray.put(theta)
        done = self.scheduler.run(
            len(shares), lambda actor, i: _call(actor.evaluate, theta_ref, shares[i], steps, lr, probe, split),
            "evaluation")
        return [r.value.curves for r in done.results]

    def _reducer(self, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node not in self._reducers:
            self._reducers[node] = self._ray.remote(NodeReducer).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return self._reducers[node]

    def maintain(self) -> None:
        self.pool.maintain()

    def resources(self) -> dict[str, Any]:
        return {"resources.workers": self.size, **self.session.resources()}

    def node_ids(self) -> list[str]:
        return self.pool.node_ids()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for r in self._reducers.values():
            self._ray.kill(r, no_restart=True)
        self._reducers = {}
        self.session.close()


class NodeReducer:
    """Sums the gradients that workers on its node left in the node's object store (zero-copy reads)."""

    def sum(self, *grads: np.ndarray) -> np.ndarray:
        return sum_grads(list(grads))


def _call(method: Any, *args: Any):
    from orchestrator.actor_pool import Submitted

    return Submitted(method.remote(*args))


def _split(actor: Any, theta_ref: Any, share: EpisodeIds):
    """meta_gradient_parts: wait for the header; the gradient's ref stays where it was computed."""
    from orchestrator.actor_pool import Submitted

    header, grad = actor.meta_gradient_parts.options(num_returns=2).remote(theta_ref, share)
    return Submitted(header, grad)


def make_group(cfg: Config) -> LocalGroup | WorkerGroup:
    return WorkerGroup(cfg) if cfg.workers.mode == "ray" else LocalGroup(cfg)
