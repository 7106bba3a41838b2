"""Tracking overhead per meta-step: in-process sine MAML (the fastest workload) with tracking off vs on.

Runs the same meta-steps with a ``NullTracker`` and with a real MLflow tracker
(SQLite by default, or ``--uri http://127.0.0.1:5000`` for a server), logging
every metric of every step exactly as ``metaray train`` does, alternating
off/on blocks so machine noise hits both. Prints the wall time per step of the
training loop (what the user waits for), the ratio, and the time ``close()``
takes to flush what is still queued at the end.

    python benchmarks/tracking_overhead.py [--steps 2000] [--blocks 3] [--uri sqlite:////tmp/bench.db]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.build import build_algorithm
from orchestrator.config import parse_config
from orchestrator.group import LocalGroup
from orchestrator.learner import CentralLearner
from orchestrator.tracking import MlflowTracker, NullTracker


def run_block(cfg, tracker, steps: int) -> tuple[float, int]:
    group = LocalGroup(cfg)
    learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
    for _ in range(20):  # warm-up, not logged
        learner.meta_step()
    start = time.perf_counter()
    for _ in range(steps):
        metrics = learner.meta_step()
        tracker.log_metrics(metrics, learner.step - 1)
    return (time.perf_counter() - start) / steps, len(metrics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--uri", default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="metaray-bench-"))
    uri = args.uri or f"sqlite:///{folder / 'mlflow.db'}"
    cfg = parse_config({"workers": {"mode": "inprocess", "num_workers": 1},
                        "run": {"name": "tracking-bench", "dir": str(folder / "runs")},
                        "tracking": {"uri": uri, "experiment": "tracking-overhead"}})
    off, on, flush, startup = [], [], [], []
    for _ in range(args.blocks):
        off.append(run_block(cfg, NullTracker(), args.steps)[0])
        t = time.perf_counter()
        tracker = MlflowTracker(cfg)
        tracker.writer.wait_ready()
        startup.append(time.perf_counter() - t)
        per_step, metrics_per_step = run_block(cfg, tracker, args.steps)
        on.append(per_step)
        t = time.perf_counter()
        tracker.close()
        flush.append(time.perf_counter() - t)
    o, n = statistics.median(off), statistics.median(on)
    print(f"sine MAML in-process, {args.steps} steps x {args.blocks} blocks, store {uri.split(':')[0]}")
    print(f"tracking off: {o * 1e3:.3f} ms/step   on: {n * 1e3:.3f} ms/step   overhead: {(n / o - 1):+.1%}")
    print(f"{metrics_per_step} metrics per step; one-off: tracker start {statistics.median(startup):.2f} s, "
          f"flush at close() {statistics.median(flush):.2f} s (medians)")


if __name__ == "__main__":
    main()
