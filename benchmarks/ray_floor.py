"""Ray's own per-step floor: the round trip of one meta-step's calls with no work in them.

Two actors each receive θ's bytes and the share's episode ids and return a gradient-sized float32 array
at once, the shape of a metaray step with 2 workers, nothing computed. Measured two ways:

- plain actor calls (``actor.f.remote`` + ``ray.get``), what ``WorkerGroup`` uses;
- a Ray Compiled Graph of the same calls (shared-memory channels, no per-call scheduling), the
  lower bound a rewrite onto compiled graphs could reach.

``benchmarks/throughput.py`` prints these next to its Ray rows, so the rows' "ray overhead" can be
read against what Ray itself costs on the same machine in the same run. ``--real`` also times real
meta-steps both ways: ``WorkerGroup.meta_gradient`` against a compiled graph over the same TaskWorker
actors (sine MAML, 2 workers), alternating, to see whether compiled graphs would pay with work in the calls.

    python benchmarks/ray_floor.py --calls 300 --real
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np


class Echo:
    def __init__(self, numel: int):
        self.grad = np.zeros(numel, dtype=np.float32)

    def step(self, message):
        return self.grad


def floor_ms(numel: int, workers: int = 2, calls: int = 200) -> dict[str, float]:
    """Median ms per step of ``workers`` empty calls: {"plain": ..., "compiled": ... (nan if unavailable)}."""
    import ray

    actors = [ray.remote(num_cpus=0)(Echo).remote(numel) for _ in range(workers)]
    theta = np.zeros(numel, dtype=np.float32).tobytes()
    message = (theta, (0, 0, 25))  # θ's bytes and an episode-id triple, as a step sends them
    ray.get([a.step.remote(message) for a in actors])
    out = {"plain": _median_ms(lambda: ray.get([a.step.remote(message) for a in actors]), calls)}
    try:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            dag = MultiOutputNode([a.step.bind(inp) for a in actors])
        compiled = dag.experimental_compile()
    except Exception as e:  # noqa: BLE001 - a Ray without compiled graphs: say so, keep the plain number
        print(f"compiled graph unavailable: {type(e).__name__}: {e}")
        out["compiled"] = float("nan")
    else:
        try:
            ray.get(compiled.execute(message), timeout=300)  # the first execution sets the channels up
            out["compiled"] = _median_ms(lambda: ray.get(compiled.execute(message)), calls)
        finally:
            compiled.teardown(kill_actors=True)
    for a in actors:
        ray.kill(a)  # (already gone after a compiled graph's teardown: a no-op)
    return out


def real_step_ms(config: str, steps: int = 60, rounds: int = 3) -> dict[str, float]:
    """Median ms per real meta-step (2 workers) through ``WorkerGroup`` and through a compiled graph over the
    same actors, with the slowest share's compute of each."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    from learners.params import ParamSpec
    from orchestrator.build import build_algorithm
    from orchestrator.config import load_config
    from orchestrator.workers.group import make_group
    from orchestrator.workers.messages import ids_message, received, theta_message
    from tasks.episode import EpisodeIds

    cfg = load_config(config, ["workers.mode=ray", "workers.num_workers=2", "tracking.enabled=false"])
    init = build_algorithm(cfg).init_params(cfg.run.seed)
    theta = ParamSpec.of(init).flatten(init).detach().numpy().astype("float32")
    group = make_group(cfg)
    try:
        with InputNode() as inp:
            dag = MultiOutputNode([s.actor.meta_gradient.bind(inp[0], inp[i + 1])
                                   for i, s in enumerate(group.pool.slots)])
        compiled = dag.experimental_compile()
        try:
            def shares(step):
                return EpisodeIds(cfg.run.seed, step, tuple(range(cfg.outer.meta_batch_size))).split(2)

            ways = {"plain": lambda step: group.meta_gradient(theta, shares(step)).compute_s,
                    "compiled": lambda step: max(received(r).compute_s for r in ray.get(
                        compiled.execute(theta_message(theta), *map(ids_message, shares(step))), timeout=300))}
            times = {k: [] for k in ways}
            computes = {k: [] for k in ways}
            step = 0
            for r in range(rounds + 1):  # round 0 warms up (the graph's channels, the workers)
                for name, run in ways.items():
                    for _ in range(steps):
                        start = time.perf_counter()
                        compute = run(step)
                        step += 1
                        if r:
                            times[name].append(time.perf_counter() - start)
                            computes[name].append(compute)
        finally:
            compiled.teardown()
    finally:
        group.close()
    return {f"{k} {what}": statistics.median(v[k]) * 1e3 for what, v in (("step", times), ("compute", computes))
            for k in v}


def _median_ms(call, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1761, help="θ's size (sine MLP 40-40: 1761)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--real", action="store_true", help="also time real sine meta-steps, plain and compiled")
    ap.add_argument("--config", default="configs/sine-maml.yaml", help="the config --real trains")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    try:
        ms = floor_ms(args.numel, args.workers, args.calls)
        real = real_step_ms(args.config) if args.real else None
    finally:
        ray.shutdown()
    print(f"Ray floor, {args.workers} empty calls per step, θ {args.numel} floats: plain actor calls "
          f"{ms['plain']:.2f} ms, compiled graph {ms['compiled']:.2f} ms")
    if real is not None:
        print(f"real meta-steps ({args.config}, 2 workers), median ms: " +
              ", ".join(f"{k} {v:.2f}" for k, v in real.items()))


if __name__ == "__main__":
    main()
