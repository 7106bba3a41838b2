"""The worker actors of a run and their health: start, probe, restart, drop, grow.

Each actor sits in a ``Slot`` whose state is explicit:

    starting --ready()--> idle --submit--> busy --release--> idle
                                 busy --the actor died--> suspect --ready() answers--> idle
                                 suspect --no answer for DROP_AFTER_S--> dropped

A slot is ``busy`` from the call it was given until that call has finished, even if the caller
stopped waiting for it (a straggler overtaken by a copy): an actor runs one call at a time, so
handing it another would only queue behind the old one. Actors restart themselves
(``max_restarts``); Ray never retries a call (``max_task_retries=0``): the share scheduler
decides what is re-run. Faults are counted in ``FaultLog``, which the checkpoint keeps.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.registry import plugin_modules
from orchestrator.config import Config
from orchestrator.errors import RunFailed, one_line
from orchestrator.workers.faults import FaultDrill, FaultLog
from orchestrator.workers.messages import EvalResult, ShareCall, ids_of
from orchestrator.workers.ray_session import RaySession, StoreMissing, local_store
from orchestrator.workers.worker import TaskWorker

log = logging.getLogger("metaray")


class RemoteWorker(TaskWorker):
    """A TaskWorker as a Ray actor."""

    def __init__(self, config: dict[str, Any], index: int, shipped: list | None, plugins: list, drill: FaultDrill | None):
        # A constructor that raises kills the actor, and Ray only keeps the error's text. Keep the exception
        # and raise it from ready() instead: the pool then re-raises the worker's own error, type and all.
        self._init_error: Exception | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # raised by Ray's own property internals
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            super().__init__(config, index, restarted=restarted, store_path=local_store(config, shipped),
                             plugins=plugins, drill=drill, prefetch=True)
        except Exception as e:  # noqa: BLE001 - re-raised by ready()
            self._init_error = e

    def ready(self) -> str:
        if self._init_error is not None:
            raise self._init_error
        return super().ready()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def store_path(self) -> str | None:
        return getattr(self.cfg.task, "store", None)

    # Calls from the learner carry episode ids and return results as plain tuples (``messages``: cheaper for
    # Ray to serialize than dataclasses).
    def meta_gradient(self, theta, ids) -> tuple:
        return super().meta_gradient(theta, ids_of(ids)).message()

    def meta_gradient_parts(self, theta, ids):
        header, grad = super().meta_gradient_parts(theta, ids_of(ids))
        return header.on_node(self.node_id()).message(), grad

    def evaluate(self, theta, ids, steps, lr, probe=None, split="eval") -> EvalResult:
        return super().evaluate(theta, ids_of(ids), steps, lr, probe, split)


class Submitted(NamedTuple):
    """One remote call: the ref to wait for, and (``ShareCall.returns`` > 1) the refs of the parts left on the
    worker's node."""

    ref: Any
    payload: Any = None


@dataclass
class Slot:
    """One worker actor and what the pool knows about it."""

    index: int
    actor: Any
    state: str = "starting"  # starting | idle | busy | suspect
    probe: Any = None  # pending ready() call while starting or suspect
    call: Any = None  # the call in flight while busy
    incarnation: str | None = None
    shipped: bool = False  # started with the image store's bytes at hand
    since: float = field(default_factory=time.monotonic)  # when it became suspect
    retry_at: float = 0.0  # a suspect whose probe failed is probed again from then on


class ActorPool:
    # A worker that cannot be restarted for this long (its node is gone, no room elsewhere) is dropped.
    DROP_AFTER_S = 60.0
    # How long a call waits for any worker to come back when every worker is down.
    REVIVE_TIMEOUT_S = 300.0

    def __init__(self, cfg: Config, session: RaySession):
        self.cfg, self.session, self._w = cfg, session, cfg.workers
        self._config = cfg.model_dump(mode="json")
        self._plugins = plugin_modules()
        self._drill = FaultDrill.from_env()
        self._actor_cls = ray.remote(RemoteWorker).options(
            num_cpus=self._w.num_cpus, num_gpus=self._w.num_gpus, max_restarts=self._w.max_restarts,
            max_task_retries=0, scheduling_strategy=_placement())
        self.faults = FaultLog()
        self.slots: list[Slot] = []
        self._next_index = 0
        self._last_growth_check = 0.0
        for _ in range(self._w.num_workers):
            self._spawn()
        for slot in list(self.slots):
            self._start(slot)

    @property
    def size(self) -> int:
        """Workers able to take shares (idle or busy)."""
        return sum(s.state in ("idle", "busy") for s in self.slots)

    # -- calls ------------------------------------------------------------------------------------------

    def idle(self) -> list[Slot]:
        """Slots ready for a call (a busy slot whose old call has finished becomes idle here)."""
        busy = {s.call: s for s in self.slots if s.state == "busy"}
        if busy:
            done, _ = ray.wait(list(busy), num_returns=len(busy), timeout=0)
            for ref in done:
                self.release(busy[ref])
        return [s for s in self.slots if s.state == "idle"]

    def leftovers(self) -> dict[Any, Slot]:
        """Calls still running from an earlier round (overtaken stragglers), by ref."""
        return {s.call: s for s in self.slots if s.state == "busy"}

    def submit(self, slot: Slot, call: ShareCall) -> Submitted:
        method = getattr(slot.actor, call.method)
        if call.returns == 1:
            submitted = Submitted(method.remote(*call.args))
        else:
            first, *rest = method.options(num_returns=call.returns).remote(*call.args)
            submitted = Submitted(first, rest[0] if len(rest) == 1 else tuple(rest))
        slot.call, slot.state = submitted.ref, "busy"
        return submitted

    def release(self, slot: Slot) -> None:
        if slot.state == "busy":
            slot.state, slot.call = "idle", None

    def suspect(self, slot: Slot, what: str) -> None:
        """The call on ``slot`` failed because its actor died: count it and wait for the restart."""
        self.faults.add(what)
        slot.state, slot.call, slot.since = "suspect", None, time.monotonic()
        slot.probe = slot.actor.ready.remote()  # resolves once Ray has restarted the actor

    def note_incarnation(self, slot: Slot, incarnation: str) -> None:
        # An actor killed between calls restarts silently; a new incarnation id is how we notice.
        if slot.incarnation is not None and incarnation != slot.incarnation:
            self.faults.add(f"worker {slot.index} was restarted")
        slot.incarnation = incarnation

    def revive_any(self) -> None:
        """Every worker is down: wait until one is back (or give up)."""
        deadline = time.monotonic() + self.REVIVE_TIMEOUT_S
        while not any(s.state == "idle" for s in self.slots):
            self._reprobe_due()
            pending = {s.probe: s for s in self.slots if s.probe is not None}
            if not self.slots:
                raise RunFailed("no workers left: every worker was dropped; check the cluster's capacity")
            if time.monotonic() > deadline:
                raise RunFailed(f"no worker came back within {self.REVIVE_TIMEOUT_S:.0f} s")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0) if pending else ([], [])
            if not pending:
                time.sleep(0.2)
            for ref in ready:
                self._settle(pending[ref])

    # -- lifetimes --------------------------------------------------------------------------------------

    def _spawn(self, index: int | None = None) -> Slot:
        if index is None:
            index, self._next_index = self._next_index, self._next_index + 1
        shipped = self.session.shipped
        actor = self._actor_cls.remote(self._config, index, shipped, self._plugins, self._drill)
        slot = Slot(index, actor, shipped=shipped is not None, probe=actor.ready.remote())
        self.slots.append(slot)
        self.slots.sort(key=lambda s: s.index)
        return slot

    def _start(self, slot: Slot) -> None:
        """Wait for a worker of the first ones; a worker that cannot start fails the run with its own error."""
        try:
            slot.incarnation = ray.get(slot.probe, timeout=self._w.start_timeout_s)
        except GetTimeoutError:
            raise RunFailed(f"worker {slot.index} was not placed within {self._w.start_timeout_s:.0f} s: the "
                            f"cluster has no room for {self._w.num_cpus:g} CPU / {self._w.num_gpus:g} GPU per "
                            "worker (raise workers.start_timeout_s if nodes are still coming)") from None
        except RayTaskError as e:
            again = self._respawn_with_store(slot, e)
            if again is not None:
                return self._start(again)
            raise e.cause from None  # the worker's own error (a DataError, a ConfigError, ...)
        except RayActorError as e:
            raise RunFailed(f"worker {slot.index} failed to start: {_actor_cause(e)}") from None
        slot.state, slot.probe = "idle", None

    def _respawn_with_store(self, slot: Slot, error: RayTaskError) -> Slot | None:
        """A worker whose node lacks the image store: ship the store and start it again, once."""
        if slot.shipped or not isinstance(error.cause, StoreMissing):
            return None
        self.session.ship_store()
        self._remove(slot)
        return self._spawn(slot.index)

    def _settle(self, slot: Slot) -> None:
        """Resolve a finished ready() probe: the worker is back (or started), restarting, or gone."""
        try:
            incarnation = ray.get(slot.probe)
        except RayTaskError as e:
            if self._respawn_with_store(slot, e) is None:  # e.g. a node that joined later has no copy of the data
                self._remove(slot)
                log.warning("worker %d could not start (%s); continuing without it", slot.index,
                            one_line(e.cause))
            return
        except RayActorError as e:
            if self._w.max_restarts != 0 or isinstance(e, ActorUnavailableError):
                slot.probe, slot.retry_at = None, time.monotonic() + 1.0  # Ray is restarting it: ask again
                if slot.state == "starting":
                    slot.state, slot.since = "suspect", time.monotonic()
                return
            self._remove(slot)
            log.warning("worker %d is gone for good (%s); continuing without it", slot.index, _actor_cause(e))
            return
        if slot.state == "starting" and slot.index >= self._w.num_workers:
            log.warning("worker %d joined (elastic): %d workers", slot.index, self.size + 1)
        elif slot.state == "suspect":
            log.warning("worker %d is back after a restart", slot.index)
        slot.state, slot.probe, slot.incarnation = "idle", None, incarnation

    def _reprobe_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state in ("suspect", "starting") and slot.probe is None and now >= slot.retry_at:
                slot.probe = slot.actor.ready.remote()

    def maintain(self) -> None:
        """At a step boundary: take back restarted workers, drop lost ones, grow when there is room."""
        self._reprobe_due()
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.probe is not None and ray.wait([slot.probe], timeout=0)[0]:
                self._settle(slot)
            if slot in self.slots and slot.state == "suspect" and now - slot.since > self.DROP_AFTER_S:
                log.warning("worker %d has not come back in %.0f s (its node is gone?); dropping it",
                            slot.index, now - slot.since)
                self._remove(slot)
        self._grow(now)

    def _grow(self, now: float) -> None:
        target = self._w.max_workers or self._w.num_workers
        if len(self.slots) >= target or now - self._last_growth_check < 1.0:
            return
        self._last_growth_check = now
        for _ in range(min(self.session.free_workers(), target - len(self.slots))):
            self._spawn()

    def _remove(self, slot: Slot) -> None:
        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)

    def node_ids(self) -> list[str]:
        return ray.get([s.actor.node_id.remote() for s in self.slots if s.state in ("idle", "busy")])

    def close(self) -> None:
        for s in self.slots:
            ray.kill(s.actor, no_restart=True)
        self.slots = []


def _placement() -> Any:
    """Inside a placement group (a Ray Tune trial's), workers take its bundles: SPREAD would escape the group and
    compete with other trials for the cluster. Elsewhere, spread them over the nodes."""
    group = get_current_placement_group()
    return "SPREAD" if group is None else PlacementGroupSchedulingStrategy(group)


def _actor_cause(e: RayActorError) -> str:
    # Ray's message carries the constructor's traceback; its last non-empty line names the original error.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
