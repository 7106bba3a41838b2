"""What a run holds open, its tracker and its worker group, closed together and once, with the run's end status.

    with Services(tracker, out) as services:
        group = services.start_workers(cfg)
        ...                                  # FINISHED when the block ends, KILLED on a stop, FAILED on an error

The status is the MLflow run's end: ``KeyboardInterrupt`` (Ctrl-C, and ``Interrupted``: SIGTERM at a step
boundary) is KILLED, any other exception FAILED. What the tracker could not deliver is said in one line.
"""

from __future__ import annotations

from types import TracebackType

import torch

from orchestrator.config import Config
from orchestrator.run.divergence import TAG as DIVERGED_TAG
from orchestrator.tracking.open_tracker import Tracker
from orchestrator.workers.group import Group, make_group


class Services:
    def __init__(self, tracker: Tracker, out=None):
        self.tracker = tracker
        self.group: Group | None = None
        self.out = out
        self.failed = False
        self._threads = torch.get_num_threads()

    def fail(self, reason: str) -> None:
        """The run failed without an exception (it diverged): tagged with ``reason``, it ends FAILED."""
        self.failed = True
        self.tracker.log_tags({DIVERGED_TAG: reason})

    def start_workers(self, cfg: Config) -> Group:
        """The run's worker group; this process then uses the torch threads the group leaves it (until close)."""
        self.group = make_group(cfg)
        torch.set_num_threads(self.group.learner_threads())
        return self.group

    def __enter__(self) -> Services:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        if self.failed and status == "FINISHED":
            status = "FAILED"
        try:
            if self.group is not None:
                self.group.close()
        finally:
            torch.set_num_threads(self._threads)
            undelivered = self.tracker.close(status)
            if undelivered:
                print(undelivered, file=self.out)
