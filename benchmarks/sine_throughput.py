"""Sine MAML throughput: in-process vmap vs loop, and Ray with 1 and 2 workers, on the same workload.

Prints tasks/s and, per meta-step, where the time goes: compute (the slowest
worker's meta-gradient), put (θ into the object store), dispatch+get (Ray
calls and result transfer beyond compute), optimizer, and the rest of the
learner's step. Bytes per step = |θ| once + one gradient per worker.

    python benchmarks/sine_throughput.py [--steps 300] [--meta-batch 25] [--algorithm maml]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

import ray

from orchestrator.build import build_algorithm
from orchestrator.config import parse_config
from orchestrator.group import make_group
from orchestrator.learner import CentralLearner


def measure(cfg, steps: int, warmup: int = 20) -> dict[str, float]:
    group = make_group(cfg)
    try:
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        for _ in range(warmup):
            learner.meta_step()
        rows = [learner.meta_step() for _ in range(steps)]
        # θ out once, one gradient back per worker (in-process nothing crosses a process boundary).
        crossing = 4 * learner.spec.numel * (1 + group.size) if cfg.workers.mode == "ray" else 0
    finally:
        group.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("perf/")}
    med["bytes_per_step"] = crossing
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--algorithm", default="maml")
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    base = {"algorithm": {"name": args.algorithm}, "outer": {"meta_batch_size": args.meta_batch}}
    setups = [
        ("in-process vmap", {"workers": {"mode": "inprocess", "num_workers": 1}, "algorithm": {"strategy": "vmap"}}),
        ("in-process loop", {"workers": {"mode": "inprocess", "num_workers": 1}, "algorithm": {"strategy": "loop"}}),
        ("ray 1 worker (vmap)", {"workers": {"mode": "ray", "num_workers": 1}, "algorithm": {"strategy": "vmap"}}),
        ("ray 2 workers (vmap)", {"workers": {"mode": "ray", "num_workers": 2}, "algorithm": {"strategy": "vmap"}}),
    ]
    print(f"sine {args.algorithm}, meta-batch {args.meta_batch}, {args.steps} steps, {os.cpu_count()} CPUs; "
          "median per step")
    header = f"{'setup':<22}{'tasks/s':>9}{'step ms':>9}{'compute':>9}{'put':>7}{'disp+get':>9}{'optim':>7}{'other':>7}{'overhead':>9}{'KB/step':>9}"
    print(header)
    results = {}
    for name, overrides in setups:
        data = {**base, **{k: {**base.get(k, {}), **v} for k, v in overrides.items()}}
        m = measure(parse_config(data), args.steps if "loop" not in name else max(20, args.steps // 10))
        results[name] = m
        step = m["perf/step_s"]
        other = step - m["perf/compute_s"] - m["perf/put_s"] - m["perf/dispatch_get_s"] - m["perf/optimizer_s"]
        overhead = 1 - m["perf/compute_s"] / step
        print(f"{name:<22}{args.meta_batch / step:>9.0f}{step * 1e3:>9.2f}{m['perf/compute_s'] * 1e3:>9.2f}"
              f"{m['perf/put_s'] * 1e3:>7.2f}{m['perf/dispatch_get_s'] * 1e3:>9.2f}{m['perf/optimizer_s'] * 1e3:>7.2f}"
              f"{max(0.0, other) * 1e3:>7.2f}{overhead:>9.0%}{m['bytes_per_step'] / 1024:>9.1f}")
    v, lp = results["in-process vmap"]["perf/step_s"], results["in-process loop"]["perf/step_s"]
    print(f"vmap is {lp / v:.1f}x faster than the loop; ray 2 workers vs in-process vmap: "
          f"{v / results['ray 2 workers (vmap)']['perf/step_s']:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
