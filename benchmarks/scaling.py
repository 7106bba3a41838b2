"""Scaling on a real multi-node Ray cluster on this machine, and a projection to many GPU workers.

Starts a head (no CPUs) and two worker nodes on 127.0.0.x with ``ray.cluster_utils.Cluster``, then
for each workload measures, with 1 and 2 workers (one per node) and 4 workers (two per node, flat vs
per-node gradient reduction; the nodes declare 2 CPUs each, so 4 workers share this machine's 2 cores
and their compute times are not a speed-up measurement, their bytes are): tasks/s, the step split (compute = slowest worker's meta-gradient; broadcast = putting θ;
gather = dispatch + result transfer beyond compute; optimizer), and the gradient bytes the
learner receives per step.

Workloads: sine MAML (1.8k parameters), Omniglot-shaped Conv-4 FOMAML (113k), and a ResNet-12
MetaOptNet-SVM head model (12.4M) on 28x28 images (a generated store unless ``--store``).

The projection takes the measured per-task compute, θ put and optimizer time and call round trip,
and a model of what grows with the number of workers N: θ crosses the network once per node, the
learner's link receives N gradients (flat) or one float64 partial sum per node (node), and the
learner submits and collects N calls (0.2 ms each). With ``--gbps``, ``--gpus-per-node`` and
``--gpu-speedup`` (per-task GPU speed over this CPU, an assumption: no GPU was measured) it
estimates efficiency (compute / step time) at 8, 32 and 128 GPU workers and the meta-batch size
at which orchestration overhead stays under 5%.

    python benchmarks/scaling.py [--steps 10] [--store data/omniglot.arrow]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from orchestrator.build import build_algorithm
from orchestrator.config import parse_config
from orchestrator.run.central_learner import CentralLearner
from orchestrator.workers.ray_group import WorkerGroup


def generated_store(folder: Path) -> str:
    """A small Omniglot-layout store (random strokes): enough to time the image workloads."""
    import numpy as np
    from PIL import Image

    from tasks.converters.omniglot import convert_omniglot

    rng = np.random.default_rng(0)
    src = folder / "images_background"
    for a in range(2):
        for c in range(10):
            d = src / f"Alphabet{a}" / f"character{c:02d}"
            d.mkdir(parents=True)
            for k in range(20):
                Image.fromarray((rng.random((28, 28)) > 0.8).astype(np.uint8) * 255).save(d / f"{k:02d}.png")
    return str(convert_omniglot([src], folder / "bench.arrow").dest)


def workloads(store: str) -> dict[str, dict]:
    images = {"family": "images", "store": store, "n_way": 5, "k_shot": 1, "query": 5,
              "split": {"by": "class", "train": 0.8, "test": 0.2}}
    return {
        "sine MAML": {"algorithm": {"name": "maml"}, "outer": {"meta_batch_size": 25}},
        "Conv-4 FOMAML": {"task": images, "model": {"backbone": "conv4"},
                          "algorithm": {"name": "fomaml", "inner_lr": 0.4}, "outer": {"meta_batch_size": 8}},
        "ResNet-12 SVM": {"task": images, "model": {"backbone": "resnet12"},
                          "algorithm": {"name": "metaoptnet-svm"}, "outer": {"meta_batch_size": 4}},
    }


def measure(base: dict, workers: int, reduce: str, address: str, steps: int) -> dict[str, float]:
    cfg = parse_config({**base, "workers": {"mode": "ray", "num_workers": workers, "shares": workers, "reduce": reduce,
                                            "address": address}, "tracking": {"enabled": False}})
    group = WorkerGroup(cfg)
    try:
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        learner.meta_step()  # warm-up
        rows = [learner.meta_step() for _ in range(steps)]
    finally:
        group.close()
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("perf/")}
    out["numel"] = learner.spec.numel
    out["meta_batch"] = cfg.outer.meta_batch_size
    return out


SUBMIT_S = 2e-4


def project(m1: dict, gbps: float, gpus_per_node: int, gpu_speedup: float) -> list[str]:
    """Efficiency at N GPU workers from one measured single-worker step (see the module docstring)."""
    task_s = m1["perf/compute_s"] / m1["meta_batch"] / gpu_speedup  # per task, on a GPU
    bytes_theta = 4 * m1["numel"]
    fixed = m1["perf/put_s"] + m1["perf/optimizer_s"]  # learner-side, independent of N
    # Round trip of one call, measured (its transfer removed); calls to different workers overlap, but the
    # learner submits and collects them one by one: SUBMIT_S each (Ray handles ~5-10k calls/s per process).
    latency = max(m1["perf/dispatch_get_s"] - bytes_theta / (gbps * 1.25e8), 1e-4)
    lines = []
    for n in (8, 32, 128):
        nodes = -(-n // gpus_per_node)
        for reduce, grads in (("flat", n * bytes_theta), ("node", nodes * 2 * bytes_theta)):
            # Broadcast: θ reaches every node once; gather: the learner's link receives `grads` bytes.
            comm = (nodes * bytes_theta + grads) / (gbps * 1.25e8) + latency + SUBMIT_S * n + fixed
            for batch in (n, 4 * n):
                compute = task_s * batch / n
                eff = compute / (compute + comm)
                lines.append(f"    N={n:<4} {reduce:<5} meta-batch {batch:<4} compute {compute * 1e3:8.2f} ms  "
                             f"comm+orch {comm * 1e3:8.2f} ms  efficiency {eff:5.0%}")
            need = 19 * comm * n / task_s  # compute >= 19 x overhead  <=>  overhead <= 5%
            lines.append(f"    N={n:<4} {reduce:<5} meta-batch for overhead < 5%: {need:,.0f} tasks "
                         f"({need / n:,.1f} per worker)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--store", default=None)
    ap.add_argument("--workloads", default=None, help="comma-separated subset of the workload names")
    ap.add_argument("--gbps", type=float, default=10.0, help="network bandwidth for the projection")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-speedup", type=float, default=30.0, help="per-task GPU speed-up over this CPU worker")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="metaray-scaling-"))
    store = args.store or generated_store(folder)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.2"})
    for i in range(2):
        cluster.add_node(num_cpus=2, node_ip_address=f"127.0.0.{3 + i}")
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        chosen = workloads(store)
        names = args.workloads.split(",") if args.workloads else list(chosen)
        print(f"local cluster: head (0 CPU) + 2 worker nodes (2 logical CPUs each, 2 cores in all); {args.steps} steps, "
              "one share per worker; "
              "median per step, ms")
        print(f"{'workload':<15}{'workers':>8}{'reduce':>7}{'tasks/s':>9}{'step':>9}{'compute':>9}{'bcast':>7}"
              f"{'gather':>8}{'optim':>7}{'grad MB':>9}")
        for name in names:
            single = None
            for workers, reduce in ((1, "flat"), (2, "flat"), (4, "flat"), (4, "node")):
                m = measure(chosen[name], workers, reduce, cluster.address, args.steps)
                single = single or m
                step = m["perf/step_s"]
                print(f"{name:<15}{workers:>8}{reduce:>7}{m['meta_batch'] / step:>9.1f}{step * 1e3:>9.1f}"
                      f"{m['perf/compute_s'] * 1e3:>9.1f}{m['perf/put_s'] * 1e3:>7.1f}"
                      f"{m['perf/dispatch_get_s'] * 1e3:>8.1f}{m['perf/optimizer_s'] * 1e3:>7.1f}"
                      f"{m['perf/gathered_mb']:>9.2f}", flush=True)
            print(f"  projection for {name} ({single['numel']:,} parameters; {args.gbps:g} Gbit/s, "
                  f"{args.gpus_per_node} GPUs/node, GPU {args.gpu_speedup:g}x this CPU per task):")
            print("\n".join(project(single, args.gbps, args.gpus_per_node, args.gpu_speedup)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
