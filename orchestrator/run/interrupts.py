"""Ctrl-C and preemption: SIGINT and SIGTERM stop a run at the next step boundary, then it checkpoints.

Spot nodes, Kubernetes and ``ray job stop`` send SIGTERM; a user presses Ctrl-C. Both mean the same:
while training, the signal is noted and the loop stops at the end of the current meta-step
(``StopSignals.requested``), checkpoints there, marks the MLflow run KILLED and exits 143 (SIGTERM) or
130 (SIGINT). Outside the loop (evaluation, start-up) or on a second signal, ``Interrupted`` is raised
at once. Handlers can only be installed from the main thread; elsewhere (a thread, a Ray actor) the
run is stopped through ``should_stop`` instead.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was told to stop by ``signum``; ``exit_code`` is the shell's 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM handling for one run; ``graceful`` while the training loop can stop at a step boundary."""

    def __init__(self, should_stop: Callable[[], bool] | None = None):
        self.signum: int | None = None
        self.graceful = False
        self._should_stop = should_stop
        self._installed = False

    @property
    def requested(self) -> bool:
        if self.signum is None and self._should_stop is not None and self._should_stop():
            self.signum = signal.SIGTERM  # told from outside (a learner actor, by its driver): as a preemption
        return self.signum is not None

    def check(self) -> None:
        """At a step boundary: raise ``Interrupted`` if a stop was requested."""
        if self.requested:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self.graceful and first):
            raise Interrupted(signum)

    @contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Route SIGINT and SIGTERM here for the duration. A no-op off the main thread, and for a run stopped from
        outside (``should_stop``: a learner actor, whose process's signals belong to Ray)."""
        if threading.current_thread() is not threading.main_thread() or self._should_stop is not None:
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._installed = True
        try:
            yield self
        finally:
            self._installed = False
            for s, handler in old.items():
                # None: a handler installed outside Python (by a native library); the default is what is left.
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def reclaim(self) -> None:
        """Route the signals here again after a library installed its own handlers (``ray.init`` installs one
        for SIGTERM that aborts the process); a no-op outside ``installed``."""
        if self._installed:
            for s in SIGNALS:
                signal.signal(s, self._handle)

    @contextmanager
    def graceful_section(self) -> Iterator[None]:
        """Within it a first signal only sets ``requested``; the loop stops at its next boundary."""
        self.graceful = True
        try:
            yield
        finally:
            self.graceful = False
