"""Sweep wall time: N sine trials one after another in one process (how `metaray sweep` ran before Ray
Tune) against Ray Tune running 2 trials at once; the projected time on a cluster; and how one SQLite store
takes the metric writes of several concurrent trials.

    python benchmarks/sweep.py [--trials 8] [--steps 300] [--concurrent 2] [--writers 1,4,8,16]

Every trial is the same kind of run (sine MAML in-process, sine's fastest setup; the same config but for
outer.lr), tracked into one SQLite store, nested under a parent run; a trial takes one CPU. The projection: a sweep costs a fixed start-up plus
ceil(trials / slots) rounds of one trial, where a cluster gives every concurrent trial its own cores; the
per-trial time and the start-up are taken from the Tune run measured here.

Store part: W processes each send a trial's metrics (15 per step, one batch of 20 steps at a time, back to
back: far denser than real trials, which send one batch per `tracking.flush_every_s`) to one SQLite file;
prints lock errors and the latency of a batch.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def config(folder: Path, steps: int) -> Path:
    cfg = {
        "run": {"name": "bench", "dir": str(folder / "runs"), "checkpoint_every": max(1, steps // 4),
                "log_every": max(1, steps // 10)},
        "task": {"k_shot": 10, "query": 10},
        "algorithm": {"name": "maml", "inner_steps": 1, "inner_lr": 0.01},
        "outer": {"meta_batch_size": 25, "steps": steps, "optimizer": "sgd"},
        "workers": {"mode": "inprocess", "learner_num_cpus": 1},  # sine's fastest setup (README, Performance)
        "eval": {"tasks": 100, "steps": [0, 1, 10]},
        "tracking": {"plots": False, "log_model": False, "log_checkpoint": False},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lrs(n: int) -> str:
    return "[" + ", ".join(f"{0.001 * 1.5 ** i:.6g}" for i in range(n)) + "]"


def sequential(path: Path, n: int, uri: str) -> float:
    """The old `metaray sweep`: every trial's config trained in turn, in this process, under one parent run."""
    from orchestrator import train
    from orchestrator.sweep.plan import plan
    from orchestrator.tracking.open_tracker import open_tracker

    p = plan([str(path)], grid=[f"outer.lr={lrs(n)}"], name="sequential", experiment="bench-sweep")
    p.folder.mkdir(parents=True)
    start = time.perf_counter()
    parent = open_tracker(p.first.model_copy(update={"run": p.first.run.model_copy(update={"name": "sequential"})}),
                          command="sweep", run_dir=p.folder)
    try:
        for t in p.trials:
            with open(p.folder / f"{t.name}.log", "w") as out:
                train(t.config, parent_run_id=parent.run_id, out=out)
    finally:
        parent.close()
    return time.perf_counter() - start


def tuned(path: Path, n: int, concurrent: int, uri: str) -> tuple[float, float, float]:
    """Wall time with Ray Tune, the start-up + summary overhead, and the median time of one trial."""
    from mlflow import MlflowClient

    from orchestrator.sweep.tuner import sweep

    start = time.perf_counter()
    with open(path.parent / "tune.log", "w") as out:
        result = sweep([str(path)], grid=[f"outer.lr={lrs(n)}"], name="tune", experiment="bench-sweep",
                       max_concurrent=concurrent, out=out)
    wall = time.perf_counter() - start
    assert not result.failed and all(t.status == "completed" for t in result.trials)
    client = MlflowClient(uri)
    runs = [client.get_run(t.run_id).info for t in result.trials]
    for t in result.trials:  # nothing lost to the shared store
        assert len(client.get_metric_history(t.run_id, "meta/loss")) == t.step
    span = (max(r.end_time for r in runs) - min(r.start_time for r in runs)) / 1000
    per_trial = statistics.median((r.end_time - r.start_time) / 1000 for r in runs)
    return wall, wall - span, per_trial


def _writer(uri: str, experiment: str, batches: int, out) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    run = client.create_run(experiment)
    errors, latency = 0, []
    for b in range(batches):
        metrics = [Metric(f"m{k}", float(s), int(time.time() * 1000), s) for s in range(20 * b, 20 * b + 20)
                   for k in range(15)]
        t = time.perf_counter()
        try:
            client.log_batch(run.info.run_id, metrics=metrics)
        except Exception:  # noqa: BLE001 - counted: a lock error is what this measures
            errors += 1
        latency.append(time.perf_counter() - t)
    out.put((errors, latency))


def store(writers: list[int], batches: int) -> None:
    from mlflow import MlflowClient

    ctx = multiprocessing.get_context("spawn")
    print(f"\none SQLite store, W writer processes x {batches} batches of 300 metrics, back to back:")
    print(f"{'W':>3} {'lock errors':>12} {'batch p50 s':>12} {'batch p95 s':>12} {'batches/s, all':>15}")
    for w in writers:
        folder = Path(tempfile.mkdtemp(prefix="metaray-store-"))
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        experiment = MlflowClient(uri).create_experiment("store")
        out = ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(uri, experiment, batches, out)) for _ in range(w)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        wall = time.perf_counter() - start
        for p in procs:
            p.join()
        lat = sorted(x for _, ls in results for x in ls)
        print(f"{w:>3} {sum(e for e, _ in results):>12} {statistics.median(lat):>12.3f} "
              f"{lat[int(0.95 * (len(lat) - 1))]:>12.3f} {w * batches / wall:>15.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="meta-steps per trial")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once under Tune on this machine")
    ap.add_argument("--writers", default="1,4,8,16", help="concurrent store writers to measure ('' to skip)")
    ap.add_argument("--batches", type=int, default=50, help="batches per store writer")
    ap.add_argument("--skip-sweeps", action="store_true")
    args = ap.parse_args()
    import os

    folder = Path(tempfile.mkdtemp(prefix="metaray-bench-sweep-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if not args.skip_sweeps:
        path = config(folder, args.steps)
        seq = sequential(path, args.trials, uri)
        wall, overhead, per_trial = tuned(path, args.trials, args.concurrent, uri)
        n = args.trials
        print(f"{n} sine trials x {args.steps} meta-steps, in-process, {os.cpu_count()} cores")
        print(f"  sequential, one process (before):      {seq:7.1f} s")
        print(f"  Ray Tune, {args.concurrent} trials at once:           {wall:7.1f} s   speed-up {seq / wall:.2f}x")
        print(f"  of which start-up + summary:           {overhead:7.1f} s; one trial (median): {per_trial:.1f} s")
        print("  projected on a cluster (every concurrent trial on its own cores):")
        for slots in (2, 4, 8, 32):
            projected = overhead + math.ceil(n / slots) * per_trial
            print(f"    {slots:>2} trials at once: {projected:7.1f} s   speed-up {seq / projected:.2f}x")
    if args.writers:
        store([int(w) for w in args.writers.split(",")], args.batches)


if __name__ == "__main__":
    main()
