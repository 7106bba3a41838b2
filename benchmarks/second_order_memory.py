"""Peak memory and step time of second-order MAML, plain vs checkpointed inner steps, and of iMAML, vs inner steps.

Conv-4 (64 filters), 5-way 1-shot, 5 queries per class, 28x28 generated images (Omniglot's shape), one
thread, tasks one at a time (the per-task loop the Conv-4 configs use). Each point runs in a fresh
subprocess: peak memory is the growth of the process's maximum resident set (``ru_maxrss``) over one
meta-gradient, measured after everything else is built, so it is what the meta-gradient itself needs.
Step time is the median of the following ``--repeats`` meta-gradients.

    python benchmarks/second_order_memory.py                      # steps 1 5 10 20 40, meta-batch 2
    python benchmarks/second_order_memory.py --steps 1 5 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "plain": {"name": "maml", "inner_lr": 0.4},
    "checkpointed": {"name": "maml", "inner_lr": 0.4, "checkpoint_inner": True},
    "imaml": {"name": "imaml", "inner_lr": 0.1, "lam": 2.0, "cg_steps": 5},
}


def point(method: str, steps: int, tasks: int, repeats: int) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch

    from learners.models.conv4 import Conv4
    from learners.objective import CrossEntropy
    from learners.registry import Parts, variant
    from tasks.episode import EpisodeBatch

    torch.set_num_threads(1)
    with torch.device("meta"):
        model = Conv4(1, 28, 5)
    def build(inner_steps: int):
        settings = {**METHODS[method], "inner_steps": inner_steps, "strategy": "loop"}
        return variant(settings["name"])(**settings).build(Parts(model, CrossEntropy(), 28 * 28, 5, "loop"))

    def episodes(n: int, shots: int, queries: int) -> EpisodeBatch:
        labels = torch.arange(5)
        return EpisodeBatch(torch.rand(n, 5 * shots, 1, 28, 28, generator=g), labels.repeat(shots).repeat(n, 1),
                            torch.rand(n, 5 * queries, 1, 28, 28, generator=g), labels.repeat(queries).repeat(n, 1))

    g = torch.Generator().manual_seed(0)
    algorithm = build(steps)
    params = algorithm.init_params(0)
    batch = episodes(tasks, 1, 5)
    # Libraries allocate lazily on first use (thread pools, kernel workspaces): pay that on a one-image task with
    # one inner step first, so the peak below is the meta-gradient's own.
    small = episodes(1, 1, 1)
    build(1).meta_gradient(params, EpisodeBatch(small.support_x[:, :1], small.support_y[:, :1],
                                                small.query_x[:, :1], small.query_y[:, :1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    algorithm.meta_gradient(params, batch)
    first = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        algorithm.meta_gradient(params, batch)
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak_mb, "step_s": statistics.median(times) if times else first}


def measure(method: str, steps: int, tasks: int, repeats: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--point", method, str(steps), "--tasks", str(tasks),
                          "--repeats", str(repeats)], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 40])
    ap.add_argument("--tasks", type=int, default=2, help="tasks per meta-gradient")
    ap.add_argument("--repeats", type=int, default=2, help="timed meta-gradients per point")
    ap.add_argument("--point", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args.tasks, args.repeats)))
        return

    rows = {}
    for steps in args.steps:
        rows[steps] = {m: measure(m, steps, args.tasks, args.repeats) for m in METHODS}
        print(f"  measured {steps} inner steps: " + ", ".join(f"{m} {r['peak_mb']:.0f} MB {r['step_s']:.2f} s"
                                                            for m, r in rows[steps].items()), flush=True)
    print(f"\nConv-4 5-way 1-shot, 5 queries/class, {args.tasks} tasks per meta-gradient, 1 thread; "
          "peak = growth of max RSS over one meta-gradient (MB), time = s per meta-gradient\n")
    print("| inner steps | plain MB | checkpointed MB | iMAML MB | checkpointed / plain | iMAML / plain "
          "| plain s | checkpointed s | iMAML s | checkpointed time / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps, r in rows.items():
        p, c, i = r["plain"], r["checkpointed"], r["imaml"]
        print(f"| {steps} | {p['peak_mb']:.0f} | {c['peak_mb']:.0f} | {i['peak_mb']:.0f} "
              f"| {c['peak_mb'] / p['peak_mb']:.2f} | {i['peak_mb'] / p['peak_mb']:.2f} "
              f"| {p['step_s']:.2f} | {c['step_s']:.2f} | {i['step_s']:.2f} | {c['step_s'] / p['step_s']:.2f} |")


if __name__ == "__main__":
    main()
