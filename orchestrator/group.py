"""Worker groups: who computes the shares of a meta-step.

``WorkerGroup`` owns the TaskWorker Ray actors and everything about their
lifetimes: it starts them (resources from config, spread over nodes),
broadcasts θ once per call through the object store, hands shares out from a
queue to idle workers, and

- re-queues a share whose worker died (actors restart themselves,
  ``max_restarts=-1``; Ray never retries a task itself, ``max_task_retries=0``,
  so the group decides and every share lands in the result exactly once);
- after ``straggler_deadline_s`` also gives a still-running share to an idle
  worker; the first result wins (episodes are seed-addressed, so both are equal);
- at step boundaries (``maintain``) takes restarted workers back, drops workers
  whose node is gone for good, and grows to ``max_workers`` when the cluster
  has room (elastic).

Results come back in share order, so the sum is deterministic, and the number
of shares is fixed by config, so it does not depend on how many workers are
alive. A worker's own exception is re-raised as itself.

``LocalGroup`` runs the same TaskWorker in this process with the same shares:
the reference the Ray path is tested against, and a debugging mode.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.checkpoint import write_atomic
from orchestrator.config import Config, ConfigError
from orchestrator.messages import Aggregate, aggregate, sum_grads
from orchestrator.worker import TaskWorker
from tasks.episode import EpisodeIds

log = logging.getLogger("metaray")


@dataclass
class CallTiming:
    """Where the wall time of one group call went (seconds)."""

    put_s: float = 0.0
    wait_s: float = 0.0  # dispatch + remote compute + fetching results
    total_s: float = 0.0
    gathered_bytes: int = 0  # gradient bytes the learner received


@dataclass
class FaultLog:
    count: int = 0
    stragglers: int = 0
    events: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.count += 1
        self.events.append(what)
        log.warning("worker fault %d: %s", self.count, what)


class RunFailed(RuntimeError):
    """The run could not go on (not a user mistake); the message says what is left and how to continue."""


class LocalGroup:
    """The in-process reference: one TaskWorker, the same shares as the Ray group, in order."""

    def __init__(self, cfg: Config):
        self.size = 1
        self.worker = TaskWorker(cfg.model_dump(mode="json"), 0)
        self.faults = FaultLog()
        self.timing = CallTiming()

    def map(self, method: str, theta: np.ndarray, shares: list[EpisodeIds], *args: Any) -> list[Any]:
        start = time.perf_counter()
        out = [getattr(self.worker, method)(theta, share, *args) for share in shares]
        self.timing = CallTiming(0.0, time.perf_counter() - start, time.perf_counter() - start)
        return out

    def meta_gradient(self, theta: np.ndarray, shares: list[EpisodeIds]) -> Aggregate:
        return aggregate(self.map("meta_gradient", theta, shares))

    def maintain(self) -> None:
        pass

    def close(self) -> None:
        pass


class StoreMissing(FileNotFoundError):
    """The image store is not on this worker's node (no shared filesystem)."""


class _RayTaskWorker(TaskWorker):
    def __init__(self, config: dict[str, Any], index: int, shipped: list | None = None):
        # A constructor that raises kills the actor, and Ray only keeps the error's text. Keep the exception
        # and raise it from ready() instead: the group then re-raises the worker's own error, type and all.
        self._init_error: Exception | None = None
        try:
            # A restart re-runs this constructor; fault injection fires only in the first incarnation.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # raised by Ray's own property internals
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            super().__init__(config, index, restarted=restarted, store_path=_local_store(config, shipped))
        except Exception as e:  # noqa: BLE001 - re-raised by ready()
            self._init_error = e

    def ready(self) -> str:
        if self._init_error is not None:
            raise self._init_error
        return super().ready()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def meta_gradient_parts(self, theta: np.ndarray, ids: EpisodeIds) -> tuple[Any, np.ndarray]:
        header, grad = super().meta_gradient_parts(theta, ids)
        return replace(header, node=self.node_id()), grad

    def store_path(self) -> str | None:
        return getattr(self.cfg.task, "store", None)


def _local_store(config: dict[str, Any], shipped: list | None) -> str | None:
    """The image store as this node sees it: the configured path if it is here, else a node-local copy of the
    bytes the learner shipped through the object store (written once per node, atomically)."""
    path = (config.get("task") or {}).get("store")
    if path is None or os.path.exists(path):
        return None
    if not shipped:
        raise StoreMissing(f"image store {path} is not on node {ray.get_runtime_context().get_node_id()[:8]}")
    ref, content_hash = shipped
    cache = Path(tempfile.gettempdir()) / "metaray-data" / f"{content_hash.replace(':', '-')}.arrow"
    if not cache.exists():
        write_atomic(cache, ray.get(ref))
    return str(cache)


def connect(cfg: Config) -> bool:
    """Join the configured Ray cluster, or start Ray embedded; True when this call started it."""
    if ray.is_initialized():
        return False
    w = cfg.workers
    if w.address:
        try:
            ray.init(address=w.address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ConfigError(f"workers.address: cannot connect to Ray at {w.address!r} ({reason}); start the "
                              "cluster or fix the address (none: Ray embedded on this machine)") from None
        return True
    # Embedded: reserve enough logical CPUs for every worker even on a small laptop (they then share cores).
    learner = w.learner_num_cpus if w.learner == "actor" else 0.0
    cpus = max(os.cpu_count() or 1, math.ceil(max(w.num_workers, w.max_workers or 0) * w.num_cpus + learner))
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
             _node_ip_address="127.0.0.1")
    return True


@dataclass
class _Slot:
    """One worker actor and what the group knows about it."""

    index: int
    actor: Any
    state: str = "starting"  # starting -> ready; ready -> suspect (a call failed) -> ready or dropped
    incarnation: str | None = None
    probe: Any = None  # pending ready() call while starting or suspect
    shipped: bool = False  # started with the image store's bytes at hand
    since: float = field(default_factory=time.monotonic)


class WorkerGroup:
    """Owns the TaskWorker actors of a run."""

    # A worker that cannot be restarted for this long (its node is gone, no room elsewhere) is dropped.
    DROP_AFTER_S = 60.0
    # How long a call waits for any worker to come back when every worker is down.
    REVIVE_TIMEOUT_S = 300.0
    # A share that takes down this many workers is not a flaky node but a poison pill.
    MAX_SHARE_FAILURES = 5

    def __init__(self, cfg: Config):
        self._started_ray = connect(cfg)
        self._w = cfg.workers
        self._config = cfg.model_dump(mode="json")
        self._actor_cls = ray.remote(_RayTaskWorker).options(
            num_cpus=self._w.num_cpus, num_gpus=self._w.num_gpus, max_restarts=self._w.max_restarts,
            max_task_retries=0, scheduling_strategy="SPREAD")
        self.faults = FaultLog()
        self.timing = CallTiming()
        self._slots: list[_Slot] = []
        self._next_index = 0
        self._last_growth_check = 0.0
        self._store = getattr(cfg.task, "store", None)
        self._shipped: list | None = None  # [object ref of the store's bytes, content hash] once shipped
        self._reducers: dict[str, Any] = {}  # node id -> NodeReducer actor (reduce: node)
        self._check_capacity()
        for _ in range(self._w.num_workers):
            self._spawn()
        for slot in list(self._slots):
            self._start(slot)

    def _check_capacity(self) -> None:
        """Fail fast when the workers can never be placed (a fixed cluster too small for them); on an
        autoscaling cluster the missing nodes may still come, so only warn."""
        w, total = self._w, ray.cluster_resources()
        actor = w.learner == "actor"
        short = [f"{w.num_workers} x {need:g} {kind}{' + the learner' if actor and learner else ''} > "
                 f"{total.get(kind, 0):g} in the cluster"
                 for kind, need, learner in (("CPU", w.num_cpus, w.learner_num_cpus), ("GPU", w.num_gpus, w.learner_num_gpus))
                 if w.num_workers * need + (learner if actor else 0) > total.get(kind, 0) + 1e-9]
        if not short:
            return
        message = f"workers do not fit: {'; '.join(short)}; lower workers.num_workers or workers.num_cpus/num_gpus"
        if w.address is None:  # Ray embedded on this machine: no node will ever join
            self.close()
            raise ConfigError(message)
        log.warning("%s (waiting: an autoscaler may add nodes)", message)

    def _start(self, slot: _Slot) -> None:
        try:
            slot.incarnation = ray.get(slot.probe, timeout=self._w.start_timeout_s)
        except GetTimeoutError:
            self.close()
            raise RunFailed(f"worker {slot.index} was not placed within {self._w.start_timeout_s:.0f} s: the "
                            f"cluster has no room for {self._w.num_cpus:g} CPU / {self._w.num_gpus:g} GPU per "
                            "worker (raise workers.start_timeout_s if nodes are still coming)") from None
        except RayTaskError as e:
            again = self._respawn_with_store(slot, e)
            if again is not None:
                return self._start(again)
            self.close()
            raise e.as_instanceof_cause() from None  # the worker's own error (a DataError, a ConfigError, ...)
        except RayActorError as e:
            self.close()
            raise RunFailed(f"worker {slot.index} failed to start: {_actor_cause(e)}") from None
        slot.state, slot.probe = "ready", None

    def _respawn_with_store(self, slot: _Slot, error: RayTaskError) -> _Slot | None:
        """A worker whose node lacks the image store: ship the store and start it again, once."""
        if slot.shipped or not isinstance(error.as_instanceof_cause(), StoreMissing):
            return None
        self._ship_store()
        ray.kill(slot.actor, no_restart=True)
        self._slots.remove(slot)
        return self._spawn(slot.index)

    def _ship_store(self) -> None:
        """Some node lacks the image store (no shared filesystem): put it in the object store once."""
        from tasks.store import ImageStore

        if self._shipped is not None:
            return
        content_hash = ImageStore.open(self._store).content_hash
        log.warning("image store %s is not on every node: shipping it through the object store", self._store)
        self._shipped = [ray.put(Path(self._store).read_bytes()), content_hash]

    @property
    def size(self) -> int:
        """Workers currently taking shares."""
        return sum(s.state == "ready" for s in self._slots)

    @property
    def actors(self) -> list[Any]:
        return [s.actor for s in self._slots]

    def _spawn(self, index: int | None = None) -> _Slot:
        if index is None:
            index, self._next_index = self._next_index, self._next_index + 1
        slot = _Slot(index, self._actor_cls.remote(self._config, index, self._shipped), shipped=self._shipped is not None)
        slot.probe = slot.actor.ready.remote()
        self._slots.append(slot)
        self._slots.sort(key=lambda s: s.index)
        return slot

    # -- one call ---------------------------------------------------------------------------------------

    def meta_gradient(self, theta: np.ndarray, shares: list[EpisodeIds]) -> Aggregate:
        """The step's mean meta-gradient over ``shares``; summed node by node first when ``reduce: node``."""
        if self._w.reduce == "flat":
            return aggregate(self.map("meta_gradient", theta, shares))
        parts = self.map("meta_gradient_parts", theta, shares, parts=True)
        start = time.perf_counter()
        by_node: dict[str, list[Any]] = {}
        for _, grad_ref, node in parts:
            by_node.setdefault(node, []).append(grad_ref)
        try:
            partials = ray.get([self._reducer(node).sum.remote(*refs) for node, refs in sorted(by_node.items())])
        except RayError as e:
            # A node died after computing: its gradients went with its object store. Recompute them all flat.
            self.faults.add(f"node reduction failed ({type(e).__name__}); recomputing the step's shares")
            for node in by_node:
                reducer = self._reducers.pop(node, None)
                if reducer is not None:
                    ray.kill(reducer, no_restart=True)
            return aggregate(self.map("meta_gradient", theta, shares))
        self.timing.wait_s += time.perf_counter() - start
        self.timing.total_s += time.perf_counter() - start
        self.timing.gathered_bytes = sum(p.nbytes for p in partials)
        return aggregate([header for header, _, _ in parts], partials)

    def _reducer(self, node: str) -> Any:
        if node not in self._reducers:
            self._reducers[node] = ray.remote(NodeReducer).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return self._reducers[node]

    def map(self, method: str, theta: np.ndarray, shares: list[EpisodeIds], *args: Any, parts: bool = False) -> list[Any]:
        """Run ``method(theta, share, *args)`` for every share on the workers; results in share order.

        With ``parts`` the method returns (header, payload): only the header is fetched, and each result is
        (header, payload ref, node id) so the payload can be reduced where it lies.
        """
        start = time.perf_counter()
        theta_ref = ray.put(theta)
        put_s = time.perf_counter() - start
        queue = deque(range(len(shares)))
        results: list[Any] = [None] * len(shares)
        done = [False] * len(shares)
        running: dict[Any, tuple[int, _Slot, float]] = {}  # ref -> (share, slot, started)
        copies = [0] * len(shares)
        failures = [0] * len(shares)
        idle = deque(s for s in self._slots if s.state == "ready")
        deadline = self._w.straggler_deadline_s

        payloads: dict[Any, Any] = {}

        def submit(share: int, slot: _Slot) -> None:
            call = getattr(slot.actor, method)
            if parts:
                ref, payloads[ref] = call.options(num_returns=2).remote(theta_ref, shares[share], *args)
            else:
                ref = call.remote(theta_ref, shares[share], *args)
            running[ref] = (share, slot, time.monotonic())
            copies[share] += 1

        while not all(done):
            while queue and idle:
                submit(queue.popleft(), idle.popleft())
            if not running:
                idle.extend(self._revive_any())  # every worker is down: wait for one to come back
                continue
            timeout = None
            if deadline is not None and idle:
                starts = [t for (k, _, t) in running.values() if not done[k] and copies[k] == 1]
                if starts:
                    timeout = max(0.0, min(starts) + deadline - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
            if not ready:
                self._duplicate_stragglers(running, done, copies, idle, deadline, submit)
                continue
            share, slot, _ = running.pop(ready[0])
            copies[share] -= 1
            try:
                value = ray.get(ready[0])
            except RayTaskError as e:
                raise e.as_instanceof_cause() from None  # the worker's own error, not Ray's wrapper
            except RayActorError as e:
                self._suspect(slot, f"worker {slot.index} died during {method} of step {shares[share].step} "
                                    f"(share {share}): {type(e).__name__}")
                failures[share] += 1
                if failures[share] > self.MAX_SHARE_FAILURES:  # e.g. an episode that runs every worker out of memory
                    raise RunFailed(f"share {share} of step {shares[share].step} killed its worker "
                                    f"{failures[share]} times; giving up (see the workers' logs)") from None
                if not done[share] and copies[share] == 0:
                    queue.appendleft(share)
                continue
            self._note_incarnation(slot, getattr(value, "incarnation", None))
            if not done[share]:  # with parts, `value` is the header: the gradient stays on its node
                results[share] = (value, payloads[ready[0]], value.node) if parts else value
                done[share] = True
            idle.append(slot)
        gathered = sum(getattr(getattr(r, "grad", None), "nbytes", 0) for r in results)
        self.timing = CallTiming(put_s, time.perf_counter() - start - put_s, time.perf_counter() - start, gathered)
        return results

    def _duplicate_stragglers(self, running, done, copies, idle, deadline, submit) -> None:
        now = time.monotonic()
        for share, slot, started in list(running.values()):
            if idle and not done[share] and copies[share] == 1 and now - started >= deadline:
                self.faults.stragglers += 1
                log.warning("worker %d still on share %d after %.1f s: also giving it to worker %d",
                            slot.index, share, now - started, idle[0].index)
                submit(share, idle.popleft())

    def _suspect(self, slot: _Slot, what: str) -> None:
        self.faults.add(what)
        slot.state, slot.since = "suspect", time.monotonic()
        slot.probe = slot.actor.ready.remote()  # resolves once Ray has restarted the actor

    def _revive_any(self) -> list[_Slot]:
        pending = {s.probe: s for s in self._slots if s.state in ("suspect", "starting") and s.probe is not None}
        if not pending:
            raise RunFailed("no workers left: every worker was dropped; check the cluster's capacity")
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.REVIVE_TIMEOUT_S)
        if not ready:
            raise RunFailed(f"no worker came back within {self.REVIVE_TIMEOUT_S:.0f} s")
        self._settle(pending[ready[0]])
        return [s for s in self._slots if s.state == "ready"]

    def _settle(self, slot: _Slot) -> None:
        """Resolve a finished ready() probe: the worker is back (or started), or gone for good."""
        try:
            incarnation = ray.get(slot.probe)
        except RayTaskError as e:
            if self._respawn_with_store(slot, e) is None:  # e.g. a node that joined later has no copy of the data
                ray.kill(slot.actor, no_restart=True)
                self._slots.remove(slot)
                log.warning("worker %d could not start (%s); continuing without it", slot.index,
                            e.as_instanceof_cause())
            return
        except RayActorError as e:
            self._slots.remove(slot)
            log.warning("worker %d is gone for good (%s); continuing without it", slot.index, _actor_cause(e))
            return
        if slot.state == "starting" and slot.incarnation is None and slot.index >= self._w.num_workers:
            log.warning("worker %d joined (elastic): %d workers", slot.index, self.size + 1)
        slot.state, slot.probe, slot.incarnation = "ready", None, incarnation

    def _note_incarnation(self, slot: _Slot, incarnation: str | None) -> None:
        # An actor killed between calls restarts silently; a new incarnation id is how we notice.
        if incarnation is None or incarnation == slot.incarnation:
            return
        if slot.incarnation is not None and slot.state != "suspect":
            self.faults.add(f"worker {slot.index} was restarted")
        slot.incarnation = incarnation

    # -- between steps ----------------------------------------------------------------------------------

    def maintain(self) -> None:
        """At a step boundary: take back restarted workers, drop lost ones, grow when there is room."""
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.probe is None:
                continue
            ready, _ = ray.wait([slot.probe], timeout=0)
            if ready:
                self._settle(slot)
            elif now - slot.since > self.DROP_AFTER_S and slot.state == "suspect":
                log.warning("worker %d has not come back in %.0f s (its node is gone?); dropping it",
                            slot.index, now - slot.since)
                ray.kill(slot.actor, no_restart=True)
                self._slots.remove(slot)
        self._grow(now)

    def _grow(self, now: float) -> None:
        target = self._w.max_workers or self._w.num_workers
        if len(self._slots) >= target or now - self._last_growth_check < 1.0:
            return
        self._last_growth_check = now
        free = ray.available_resources()
        room = math.floor(free.get("CPU", 0.0) / self._w.num_cpus + 1e-9)
        if self._w.num_gpus:
            room = min(room, math.floor(free.get("GPU", 0.0) / self._w.num_gpus + 1e-9))
        for _ in range(min(room, target - len(self._slots))):
            self._spawn()

    def node_ids(self) -> list[str]:
        return ray.get([s.actor.node_id.remote() for s in self._slots if s.state == "ready"])

    def close(self) -> None:
        for s in self._slots:
            ray.kill(s.actor, no_restart=True)
        for r in self._reducers.values():
            ray.kill(r, no_restart=True)
        self._slots, self._reducers = [], {}
        if self._started_ray:
            ray.shutdown()


class NodeReducer:
    """Sums the gradients that workers on its node left in the node's object store (zero-copy reads)."""

    def sum(self, *grads: np.ndarray) -> np.ndarray:
        return sum_grads(list(grads))


def _actor_cause(e: RayActorError) -> str:
    # Ray's message carries the constructor's traceback; its last non-empty line names the original error.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def make_group(cfg: Config) -> LocalGroup | WorkerGroup:
    return WorkerGroup(cfg) if cfg.workers.mode == "ray" else LocalGroup(cfg)

