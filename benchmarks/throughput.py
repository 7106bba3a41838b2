"""Meta-training throughput: in-process vmap vs loop, and Ray with 1 and 2 workers, on the same workload.

Prints tasks/s and, per meta-step, where the time goes: compute (the slowest
worker's meta-gradient), put (θ into the object store), dispatch+get (Ray
calls and result transfer beyond compute), optimizer, and the rest of the
learner's step. Bytes per step = |θ| once + one gradient per share.

    python benchmarks/throughput.py                                   # sine MAML, meta-batch 25
    python benchmarks/throughput.py --config configs/omniglot-maml-5w1s.yaml --set task.store=data/omniglot.arrow \\
        --algorithms protonet,fomaml,anil,maml --meta-batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

import ray

from orchestrator.build import build_algorithm
from orchestrator.config import load_config
from orchestrator.group import make_group
from orchestrator.learner import CentralLearner

SETUPS = {
    "in-process vmap": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=vmap"],
    "in-process loop": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=loop"],
    "ray 1 worker": ["workers.mode=ray", "workers.num_workers=1"],
    "ray 2 workers": ["workers.mode=ray", "workers.num_workers=2"],
}


def measure(cfg, steps: int, warmup: int) -> dict[str, float]:
    group = make_group(cfg)
    try:
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        for _ in range(warmup):
            learner.meta_step()
        rows = [learner.meta_step() for _ in range(steps)]
        # θ out once, one gradient back per share (in-process nothing crosses a process boundary).
        crossing = 4 * learner.spec.numel * (1 + cfg.workers.share_count) if cfg.workers.mode == "ray" else 0
    finally:
        group.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("perf/")}
    med["bytes_per_step"] = crossing
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sine-maml.yaml")
    ap.add_argument("--algorithms", default=None, help="comma-separated algorithm names (default: the config's)")
    ap.add_argument("--strategy", default="auto", help="per-task strategy of the Ray setups")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of: {', '.join(SETUPS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    base = load_config(args.config, args.overrides)
    algorithms = args.algorithms.split(",") if args.algorithms else [base.algorithm.name]
    mb = args.meta_batch or base.outer.meta_batch_size
    print(f"{args.config}: meta-batch {mb}, {args.steps} steps (+{args.warmup} warm-up), {os.cpu_count()} CPUs; "
          "median per step, times in ms")
    print(f"{'algorithm':<17}{'setup':<17}{'tasks/s':>9}{'step':>9}{'compute':>9}{'put':>7}{'disp+get':>9}"
          f"{'optim':>7}{'other':>7}{'overhead':>9}{'KB/step':>9}")
    for alg in algorithms:
        for name in args.setups.split(","):
            sets = [*args.overrides, f"algorithm.name={alg}", f"outer.meta_batch_size={mb}", *SETUPS[name]]
            if name.startswith("ray"):
                sets.append(f"algorithm.strategy={args.strategy}")
            m = measure(load_config(args.config, sets), args.steps, args.warmup)
            step = m["perf/step_s"]
            other = step - m["perf/compute_s"] - m["perf/put_s"] - m["perf/dispatch_get_s"] - m["perf/optimizer_s"]
            print(f"{alg:<17}{name:<17}{mb / step:>9.1f}{step * 1e3:>9.2f}{m['perf/compute_s'] * 1e3:>9.2f}"
                  f"{m['perf/put_s'] * 1e3:>7.2f}{m['perf/dispatch_get_s'] * 1e3:>9.2f}"
                  f"{m['perf/optimizer_s'] * 1e3:>7.2f}{max(0.0, other) * 1e3:>7.2f}"
                  f"{1 - m['perf/compute_s'] / step:>9.0%}{m['bytes_per_step'] / 1024:>9.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
