"""Share scheduling: every share of a call computed exactly once, on whichever worker is free.

Shares wait in a queue; an idle worker takes the next one. A share whose worker dies goes back to
the front of the queue (episodes are seed-addressed, so any worker recomputes it bit for bit).
After ``straggler_deadline_s`` a still-running share is also given to an idle worker; the first
result wins. Results come back in share order, whatever order they finished in, so the sum over
them is deterministic. A worker's own exception is re-raised as itself.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.errors import RunFailed
from orchestrator.workers.actor_pool import ActorPool, Slot
from orchestrator.workers.messages import ShareCall, received

log = logging.getLogger("metaray")


@dataclass(frozen=True)
class ShareResult:
    value: Any  # what the worker returned
    payload: Any  # the call's other returns (ShareCall.returns > 1): refs left where they were computed
    worker: int


@dataclass(frozen=True)
class Round:
    results: list[ShareResult]  # in share order
    wait_s: float  # dispatch + remote compute + fetching the values


class ShareScheduler:
    # A share that takes down this many workers is not a flaky node but a poison pill.
    MAX_SHARE_FAILURES = 5

    def __init__(self, pool: ActorPool, straggler_deadline_s: float | None):
        self.pool = pool
        self.deadline = straggler_deadline_s

    def run(self, calls: list[ShareCall], what: str = "call") -> Round:
        """Every share's call, each result exactly once, in share order."""
        start, n = time.perf_counter(), len(calls)
        queue = deque(range(n))
        results: list[ShareResult | None] = [None] * n
        running: dict[Any, tuple[int, Slot, float, Any]] = {}  # ref -> (share, slot, started, payload)
        copies, failures = [0] * n, [0] * n
        idle = deque(self.pool.idle())
        pending = n
        while pending:
            while queue and idle:
                share, slot = queue.popleft(), idle.popleft()
                submitted = self.pool.submit(slot, calls[share])
                running[submitted.ref] = (share, slot, time.monotonic(), submitted.payload)
                copies[share] += 1
            if not running:
                self.pool.revive_any()  # every worker is down: wait for one to come back
                idle.extend(self.pool.idle())
                continue
            leftovers = self.pool.leftovers()
            if queue or self.deadline is not None:
                # Something to hand out as soon as a worker is free: wake on the first result (or a leftover).
                refs = list(running) + [r for r in leftovers if r not in running]
                ready, _ = ray.wait(refs, num_returns=1, timeout=self._timeout(running, results, copies, idle))
                if not ready:
                    self._duplicate_stragglers(running, results, copies, idle, queue)
                    continue
            else:
                # Nothing else to do: fetching every result waits for them all, one round trip like Ray's floor
                # (benchmarks/ray_floor.py), not a wait and then a fetch.
                ready = list(running)
            values = _get_all([r for r in ready if r in running])
            for ref in ready:
                if ref not in running:  # an overtaken straggler from an earlier call finished: its worker is free
                    self.pool.release(leftovers[ref])
                    idle.append(leftovers[ref])
                    continue
                share, slot, _, payload = running.pop(ref)
                copies[share] -= 1
                try:
                    value = received(values[ref] if ref in values else ray.get(ref))
                except RayTaskError as e:
                    raise e.cause from None  # the worker's own error, not Ray's wrapper
                except RayActorError as e:
                    self.pool.suspect(slot, f"worker {slot.index} died during {what} (share {share}): "
                                            f"{type(e).__name__}")
                    failures[share] += 1
                    if failures[share] > self.MAX_SHARE_FAILURES:  # e.g. an episode that runs every worker OOM
                        raise RunFailed(f"share {share} of {what} killed its worker {failures[share]} times; "
                                        "giving up (see the workers' logs)") from None
                    if results[share] is None and copies[share] == 0:
                        queue.appendleft(share)
                    continue
                self.pool.release(slot)
                self.pool.note_incarnation(slot, value.incarnation)
                if results[share] is None:
                    results[share] = ShareResult(value, payload, slot.index)
                    pending -= 1
                idle.append(slot)
        # Copies still running stay busy in the pool until they finish; nobody waits for them.
        return Round(results, time.perf_counter() - start)

    def _timeout(self, running, results, copies, idle) -> float | None:
        """How long to wait before the oldest lone share turns straggler (None: no deadline, or nobody idle)."""
        if self.deadline is None or not idle:
            return None
        starts = [t for (k, _, t, _) in running.values() if results[k] is None and copies[k] == 1]
        return max(0.0, min(starts) + self.deadline - time.monotonic()) if starts else None

    def _duplicate_stragglers(self, running, results, copies, idle, queue) -> None:
        now = time.monotonic()
        for share, slot, started, _ in list(running.values()):
            if idle and results[share] is None and copies[share] == 1 and now - started >= self.deadline:
                self.pool.faults.stragglers += 1
                log.warning("worker %d still on share %d after %.1f s: also giving it to worker %d",
                            slot.index, share, now - started, idle[0].index)
                queue.appendleft(share)
                # The next pass of the loop submits it to the idle worker.
                return


def _get_all(refs: list) -> dict:
    """The values of finished calls in one round trip; empty when any of them failed (then fetched one by one)."""
    if not refs:
        return {}
    try:
        return dict(zip(refs, ray.get(refs)))
    except (RayTaskError, RayActorError):
        return {}
