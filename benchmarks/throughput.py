"""Meta-training throughput: a plain torch.func MAML, metaray in-process and on Ray, on the same workload.

The reference (sine configs only) is the MAML a researcher would write with torch.func and nothing
else: the grad of the mean query loss over vmap'd tasks (functional_call, one inner SGD step from
the config, second order), torch.optim.Adam with its defaults, episodes drawn with torch's generator
in one call. It has none of metaray's contract: no statistics, no dropping of non-finite tasks, no
seed-addressed episodes. Every setup then runs full meta-steps through ``CentralLearner``.

All setups are built first, then measured in alternating rounds (each round: every setup in turn,
``--warmup`` untimed steps, then ``--steps`` timed ones), so a busy machine's drift hits them alike;
numbers are medians over all timed steps. For each setup it prints tasks/s and the ratio to the
reference, and per meta-step where the time goes: compute (the slowest share's meta-gradient, as the
worker measures it), put (θ into the object store), dispatch+get (Ray calls and result transfer beyond
compute), optimizer, and ``ray overhead`` = step - compute, the orchestration cost any run logs
(perf/step_s - perf/compute_s). Bytes per step = |θ| once + one gradient per share.

``--compile`` adds "in-process compiled" (``algorithm.compile: true``) and reports its first step,
which includes torch.compile's compilation.

    python benchmarks/throughput.py                                   # sine MAML, meta-batch 25
    python benchmarks/throughput.py --generated-store --config configs/omniglot-maml-5w1s.yaml \\
        --algorithms maml,fomaml --meta-batch 8 --steps 3 --rounds 3 --setups "in-process loop"

The head-only learners' three strategies (``onepass``: one backbone pass for all of a share's tasks), Conv-4 and
ResNet-12 (add ``--set model.backbone=resnet12``):

    python benchmarks/throughput.py --generated-store --config configs/omniglot-protonet-5w1s.yaml \\
        --algorithms protonet,metaoptnet-svm --set task.train.n_way=null --set task.split.by=class --meta-batch 8 \\
        --steps 3 --rounds 3 --setups "in-process vmap,in-process loop,in-process onepass"
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from orchestrator.build import build_algorithm, build_model
from orchestrator.config import Config, load_config
from orchestrator.run.central_learner import CentralLearner
from orchestrator.workers.group import make_group

SETUPS = {
    "in-process vmap": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=vmap"],
    "in-process loop": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=loop"],
    "in-process onepass": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=onepass"],
    "in-process compiled": ["workers.mode=inprocess", "workers.num_workers=1", "algorithm.strategy=vmap",
                            "algorithm.compile=true"],
    "ray 1 worker": ["workers.mode=ray", "workers.num_workers=1"],
    "ray 2 workers": ["workers.mode=ray", "workers.num_workers=2"],
}
REFERENCE = "torch.func reference"


def reference_step(cfg: Config) -> Callable[[], dict[str, float]]:
    """One meta-step of the plain torch.func MAML on the config's sine workload (see the module docstring)."""
    model = build_model(cfg)[0].to_empty(device="cpu")
    params = {k: v.detach().clone() for k, v in build_algorithm(cfg).init_params(0).items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer.lr)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    t, k, q, lr, steps = (cfg.outer.meta_batch_size, cfg.task.k_shot, cfg.task.query, cfg.algorithm.inner_lr,
                          cfg.algorithm.inner_steps)

    def mse(p, x, y):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(steps):
            g = grad(mse)(p, sx, sy)
            p = {n: p[n] - lr * g[n] for n in p}
        return mse(p, qx, qy)

    meta_grad = grad(lambda p, *batch: vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, *batch).mean())

    def step() -> dict[str, float]:
        start = time.perf_counter()
        amp = torch.empty(t, 1, 1).uniform_(*cfg.task.amplitude, generator=gen)
        phase = torch.empty(t, 1, 1).uniform_(*cfg.task.phase, generator=gen)
        sx = torch.empty(t, k, 1).uniform_(*cfg.task.x_range, generator=gen)
        qx = torch.empty(t, q, 1).uniform_(*cfg.task.x_range, generator=gen)
        grads = meta_grad(params, sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase))
        for n, p in params.items():
            p.grad = grads[n]
        optimizer.step()
        return {"perf/step_s": time.perf_counter() - start}

    return step


class Setup:
    """A learner over its group (or the reference), stepped in rounds; keeps every timed step's metrics."""

    def __init__(self, name: str, cfg: Config | None, step: Callable[[], dict[str, float]] | None = None):
        self.name, self.cfg, self.rows = name, cfg, []
        self.group = None
        if step is None:
            self.group = make_group(cfg)
            learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group=self.group)
            step = learner.meta_step
            self.numel = learner.spec.numel
        first = time.perf_counter()
        step()
        self.first_s = time.perf_counter() - first  # includes torch.compile's compilation where compiled
        self.step = step

    def round(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            self.step()
        self.rows += [self.step() for _ in range(steps)]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rows) if key in self.rows[0] else 0.0

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sine-maml.yaml")
    ap.add_argument("--algorithms", default=None, help="comma-separated algorithm names (default: the config's)")
    ap.add_argument("--strategy", default="auto", help="per-task strategy of the Ray setups")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per setup and round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per setup and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--setups", default="in-process vmap,in-process loop,ray 2 workers",
                    help=f"comma-separated subset of: {', '.join(SETUPS)}")
    ap.add_argument("--compile", action="store_true", help="add 'in-process compiled' (first step compiles)")
    ap.add_argument("--no-reference", action="store_true", help="leave out the torch.func reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (0: torch's default)")
    ap.add_argument("--generated-store", action="store_true",
                    help="point task.store at a generated Omniglot-layout store (benchmarks/scaling.py)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.setups.split(",") + (["in-process compiled"] if args.compile else [])
    overrides = list(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if args.generated_store:
            from benchmarks.scaling import generated_store

            overrides.append(f"task.store={generated_store(Path(tmp))}")
        if any(n.startswith("ray") for n in names):
            import ray

            # A Ray of its own, even where another is running on this machine.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        base = load_config(args.config, overrides)
        algorithms = args.algorithms.split(",") if args.algorithms else [base.algorithm.name]
        mb = args.meta_batch or base.outer.meta_batch_size
        print(f"{args.config}: meta-batch {mb}, {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up) "
              f"per setup, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads here, load average "
              f"{os.getloadavg()[0]:.1f}; median per step, times in ms")
        print(f"{'algorithm':<16}{'setup':<21}{'tasks/s':>9}{'x ref':>7}{'step':>9}{'compute':>9}{'put':>6}"
              f"{'disp+get':>9}{'optim':>7}{'ray overhead':>13}{'KB/step':>9}{'first step':>11}")
        for alg in algorithms:
            setups = []
            try:
                for name in names:
                    sets = [*overrides, f"algorithm.name={alg}", f"outer.meta_batch_size={mb}", *SETUPS[name]]
                    if name.startswith("ray"):
                        sets.append(f"algorithm.strategy={args.strategy}")
                    setups.append(Setup(name, load_config(args.config, sets)))
                sine = base.task.family == "sine" and alg == "maml"
                if sine and not args.no_reference:
                    cfg = load_config(args.config, [*overrides, f"outer.meta_batch_size={mb}"])
                    setups.insert(0, Setup(REFERENCE, cfg, reference_step(cfg)))
                for _ in range(args.rounds):
                    for s in setups:
                        s.round(args.warmup, args.steps)
                ref = setups[0].median("perf/step_s") if setups[0].name == REFERENCE else math.nan
                for s in setups:
                    print(row(alg, s, mb, ref), flush=True)
                ray_setups = [s for s in setups if s.name.startswith("ray")]
                if ray_setups:
                    print(floor_line(ray_setups), flush=True)
            finally:
                for s in setups:
                    s.close()
        if any(n.startswith("ray") for n in names):
            ray.shutdown()


def floor_line(ray_setups: list[Setup]) -> str:
    """Ray's own cost of a step's calls with nothing in them (``ray_floor``), against the rows' overhead."""
    from ray_floor import floor_ms

    s = max(ray_setups, key=lambda s: s.cfg.workers.share_count)
    n = s.cfg.workers.share_count
    ms = floor_ms(s.numel, n)
    overhead = ray_overhead(s) * 1e3
    return (f"Ray's floor, {n} empty calls per step (benchmarks/ray_floor.py): plain actor calls {ms['plain']:.2f} ms "
            f"(metaray's '{s.name}' overhead above it: {overhead - ms['plain']:.2f} ms), compiled graph "
            f"{ms['compiled']:.2f} ms")


def ray_overhead(s: Setup) -> float:
    """Median seconds per step beyond the slowest share's compute (perf/step_s - perf/compute_s)."""
    return statistics.median(r["perf/step_s"] - r["perf/compute_s"] for r in s.rows)


def row(alg: str, s: Setup, mb: int, ref_step: float) -> str:
    step = s.median("perf/step_s")
    overhead = ray_overhead(s) if s.name.startswith("ray") else math.nan
    crossing = 4 * s.numel * (1 + s.cfg.workers.share_count) if s.name.startswith("ray") else 0
    ms = lambda key: f"{s.median(key) * 1e3:.2f}" if s.group is not None else "-"  # noqa: E731
    rate = f"{mb / step:.0f}" if mb / step >= 10 else f"{mb / step:.2f}"  # ResNet-12 on a CPU: < 1 task/s
    return (f"{alg:<16}{s.name:<21}{rate:>9}{ref_step / step:>7.2f}{step * 1e3:>9.2f}"
            f"{ms('perf/compute_s'):>9}{ms('perf/put_s'):>6}{ms('perf/dispatch_get_s'):>9}"
            f"{ms('perf/optimizer_s'):>7}{overhead * 1e3:>13.2f}{crossing / 1024:>9.1f}{s.first_s * 1e3:>9.0f}ms")


if __name__ == "__main__":
    main()
