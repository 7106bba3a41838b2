"""Divergence: a run whose training has blown up stops, says why, and ends FAILED.

Checked after every meta-step, before its metrics are logged, so a blown-up value never reaches MLflow (one
run at 6.6e12 would flatten every other run's curve in MLflow's shared charts). A run has diverged when

- its meta-loss is more than ``FACTOR`` times the query loss before adaptation of the same step (the inner
  loop makes tasks a thousand times worse than not adapting: e.g. ``algorithm.inner_lr`` far too large), or
  more than ``FACTOR`` times its first meta-loss (or first query loss before adaptation, if larger) in this
  process (θ itself blew up: e.g. ``outer.lr``); or
- ``SKIPPED_IN_A_ROW`` meta-steps in a row were skipped (every task's inner loop was non-finite, or every
  update would have made θ non-finite): θ is stuck.

The run then checkpoints, is not evaluated, its MLflow run gets the tag ``metaray.diverged`` (the reason) and
ends FAILED, and ``metaray train`` exits 1 with the reason; a sweep trial reports an infinite metric and ends
("diverged"), and the sweep goes on.
"""

from __future__ import annotations

import math

FACTOR = 1e3
SKIPPED_IN_A_ROW = 10
TAG = "metaray.diverged"
ADVICE = "lower algorithm.inner_lr or outer.lr"


class Divergence:
    def __init__(self) -> None:
        self.reference: float | None = None  # the first meta-loss of this process (or loss before adaptation)
        self.skipped_in_a_row = 0

    def check(self, step: int, metrics: dict[str, float], skipped: bool) -> str | None:
        """The reason meta-step ``step`` (with ``metrics``; ``skipped``: its update was not taken) shows
        divergence, or None."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= SKIPPED_IN_A_ROW:
            return (f"diverged at step {step}: {self.skipped_in_a_row} meta-steps in a row were skipped (every task "
                    f"non-finite, or θ would have become non-finite); {ADVICE}")
        loss = metrics.get("meta/loss")
        if loss is None:
            return None
        if not math.isfinite(loss):
            return f"diverged at step {step}: meta/loss is {loss}; {ADVICE}"
        before = metrics.get("inner/loss_before")
        if before is not None and math.isfinite(before) and loss > FACTOR * max(before, 1e-12):
            return (f"diverged at step {step}: meta/loss {loss:.3g} is over {FACTOR:g} times the query loss before "
                    f"adaptation ({before:.3g}); {ADVICE}")
        if self.reference is None:
            self.reference = max(loss, before) if before is not None and math.isfinite(before) else loss
        elif loss > FACTOR * max(self.reference, 1e-12):
            return (f"diverged at step {step}: meta/loss {loss:.3g} is over {FACTOR:g} times its first value "
                    f"({self.reference:.3g}); {ADVICE}")
        return None
