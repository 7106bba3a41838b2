"""Tracking overhead per meta-step: in-process sine MAML (the fastest workload) with tracking off vs on.

Runs the same meta-steps with a ``NullTracker`` and with a real MLflow tracker
(SQLite by default, or ``--uri http://127.0.0.1:5000`` for a server), logging
every metric of every step exactly as ``metaray train`` does, alternating
off/on blocks so machine noise hits both. Prints the wall time per step of the
training loop (what the user waits for), the median of the paired on/off ratios,
the time spent inside ``log_metrics``, the writer process's CPU use, and the
time ``close()`` takes to flush what is still queued at the end.

    python benchmarks/tracking_overhead.py [--steps 500] [--pairs 8] [--uri sqlite:////tmp/bench.db]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.build import build_algorithm
from orchestrator.config import parse_config
from orchestrator.run.central_learner import CentralLearner
from orchestrator.tracking.open_tracker import NullTracker
from orchestrator.tracking.tracker import MlflowTracker
from orchestrator.workers.group import LocalGroup


def run_block(cfg, tracker, steps: int) -> tuple[float, float, int]:
    """Per-step wall time of ``steps`` meta-steps, and the part of it spent inside ``log_metrics``."""
    group = LocalGroup(cfg)
    learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
    for _ in range(20):  # warm-up, not logged
        learner.meta_step()
    in_log = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        metrics = learner.meta_step()
        t = time.perf_counter()
        tracker.log_metrics(metrics, learner.step - 1)
        in_log += time.perf_counter() - t
    return (time.perf_counter() - start) / steps, in_log / steps, len(metrics)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500, help="meta-steps per block")
    ap.add_argument("--pairs", type=int, default=8, help="off/on block pairs (order alternates)")
    ap.add_argument("--uri", default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="metaray-bench-"))
    uri = args.uri or f"sqlite:///{folder / 'mlflow.db'}"
    cfg = parse_config({"workers": {"mode": "inprocess", "num_workers": 1},
                        "run": {"name": "tracking-bench", "dir": str(folder / "runs")},
                        "tracking": {"uri": uri, "experiment": "tracking-overhead"}})
    off, on, in_log, startup, flush, writer_cpu = [], [], [], [], [], []

    def tracked() -> tuple[float, int]:
        t = time.perf_counter()
        tracker = MlflowTracker(cfg)
        tracker.writer.wait_ready()
        startup.append(time.perf_counter() - t)
        cpu0 = cpu_seconds(tracker.writer.pid)
        t = time.perf_counter()
        per_step, logging, n = run_block(cfg, tracker, args.steps)
        writer_cpu.append((cpu_seconds(tracker.writer.pid) - cpu0) / (time.perf_counter() - t))
        in_log.append(logging)
        t = time.perf_counter()
        tracker.close()
        flush.append(time.perf_counter() - t)
        return per_step, n

    for i in range(args.pairs):
        if i % 2 == 0:  # alternate the order so a drifting machine does not favour either side
            off.append(run_block(cfg, NullTracker(), args.steps)[0])
            per_step, metrics_per_step = tracked()
        else:
            per_step, metrics_per_step = tracked()
            off.append(run_block(cfg, NullTracker(), args.steps)[0])
        on.append(per_step)
    ratios = [n / o - 1 for o, n in zip(off, on)]
    print(f"sine MAML in-process, {args.pairs} off/on pairs of {args.steps} steps, store {uri.split(':')[0]}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"tracking off: {statistics.median(off) * 1e3:.3f} ms/step   on: {statistics.median(on) * 1e3:.3f} ms/step"
          f"   overhead (median of paired ratios): {statistics.median(ratios):+.1%}"
          f"   pairs: {' '.join(f'{r:+.0%}' for r in ratios)}")
    print(f"inside log_metrics: {statistics.median(in_log) * 1e6:.1f} us/step; writer process CPU while training: "
          f"{statistics.median(writer_cpu):.2f} cores")
    print(f"{metrics_per_step} metrics per step; one-off: tracker start {statistics.median(startup):.2f} s, "
          f"flush at close() {statistics.median(flush):.2f} s (medians)")


if __name__ == "__main__":
    main()
