"""Worker faults: the run's counters (faults survived, stragglers overtaken; kept in the checkpoint), and the
drill that makes a worker fail on purpose to rehearse them."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.config import ConfigError

log = logging.getLogger("metaray")
DRILL_ENV = "METARAY_FAULT_DRILL"


@dataclass
class FaultLog:
    count: int = 0
    stragglers: int = 0
    events: list[str] = field(default_factory=list)  # this process's, for the output; not checkpointed

    def add(self, what: str) -> None:
        self.count += 1
        self.events.append(what)
        log.warning("worker fault %d: %s", self.count, what)

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count, "stragglers": self.stragglers}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count, self.stragglers = int(state["count"]), int(state["stragglers"])


@dataclass(frozen=True)
class FaultDrill:
    """Make one worker fail on purpose, for tests and fire drills: at meta-step ``step`` the worker with index
    ``worker`` exits (as a crashed or OOM-killed process would) or sleeps ``seconds`` (a straggler).

    Set through the environment of the command, never the run config::

        METARAY_FAULT_DRILL='{"worker": 1, "step": 2, "action": "exit"}' metaray train ...
    """

    worker: int
    step: int
    action: Literal["exit", "sleep"] = "exit"
    seconds: float = 30.0

    @staticmethod
    def from_env() -> FaultDrill | None:
        raw = os.environ.get(DRILL_ENV)
        if not raw:
            return None
        try:
            drill = FaultDrill(**json.loads(raw))
            if drill.action not in ("exit", "sleep") or min(drill.worker, drill.step) < 0:
                raise ValueError(drill)
            return drill
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{DRILL_ENV}={raw!r}: expected JSON such as "
                              '{"worker": 1, "step": 2, "action": "exit"} (action exit or sleep, with "seconds")'
                              ) from e
