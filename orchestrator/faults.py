"""The fault counters of a run: worker faults survived and stragglers overtaken, kept in the checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("metaray")


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
