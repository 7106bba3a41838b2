"""metaray's cost above Ray's own: a real tracked `metaray train` on Ray against Ray's floor, in one run.

In a temporary folder (so that ./mlflow.db is the run's own store), for each round:

- Ray's floor (``ray_floor.floor_ms``): a step's empty actor calls (θ's bytes in, a gradient-sized array out),
  one per share, in a Ray of its own;
- ``metaray train CONFIG`` exactly as a user runs it (the CLI in a subprocess: Ray embedded, the config's
  workers, tracked to ./mlflow.db, system metrics on), then its logged ``perf/step_s`` and ``perf/compute_s``
  read back from the store;
- the floor again.

It prints, per round, the median logged overhead (perf/step_s - perf/compute_s) over the steps after the first
tenth, the floor (mean of the two around the run), metaray's part above the floor, and whether the overhead
is within the floor + ``--margin-ms`` (1.0). Also the median step, compute and the wall time per step of the
training loop (from the metrics' timestamps: logging and checkpoints included). ``--variants`` adds the same
run with ``tracking.system_metrics=false`` and with ``tracking.enabled=false`` (read from the run's printed
``perf:`` line), to see what tracking costs.

    python benchmarks/ray_overhead.py                                 # sine MAML, 2 workers, 3000 steps
    python benchmarks/ray_overhead.py --rounds 3 --variants           # the measurement in docs/performance.md

The machine should be otherwise idle: the floor and the run share its cores with anything else running.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF = re.compile(r"perf: .*?step ([\d.]+) ms, compute ([\d.]+) ms, overhead \(step - compute\) ([\d.]+) ms")


def floor(numel: int, calls: int, shares: int) -> float:
    """Ray's floor in ms per step: ``shares`` empty calls per step, in a Ray started for it alone."""
    import ray

    from ray_floor import floor_ms

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    try:
        return floor_ms(numel, shares, calls)["plain"]
    finally:
        ray.shutdown()


def train(folder: Path, config: Path, steps: int, sets: list[str]) -> tuple[dict[str, float], str]:
    """``metaray train`` in ``folder`` (its own ./mlflow.db); its metrics per step, and what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store: ./mlflow.db
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    name = f"run{len(list(folder.glob('runs/*')))}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", str(config), "--set", f"outer.steps={steps}",
           "--set", f"run.name={name}", "--set", f"run.dir={folder / 'runs'}", "--set", f"run.log_every={steps}",
           "--set", "eval.tasks=20", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"metaray train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return name, done.stdout


def logged(folder: Path, name: str) -> dict[str, float]:
    """Medians over the steps after the first tenth of the run's logged perf metrics, and its wall time per step."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(experiments, f"attributes.run_name = '{name}'")[0]
    history = {k: sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
               for k in ("perf/step_s", "perf/compute_s")}
    step, compute = history["perf/step_s"], history["perf/compute_s"]
    skip = len(step) // 10
    return {"step": statistics.median(m.value for m in step[skip:]) * 1e3,
            "compute": statistics.median(m.value for m in compute[skip:]) * 1e3,
            "overhead": statistics.median(a.value - b.value for a, b in zip(step[skip:], compute[skip:])) * 1e3,
            "wall": (step[-1].timestamp - step[skip].timestamp) / max(1, len(step) - 1 - skip)}


def printed(stdout: str) -> dict[str, float]:
    """The step, compute and overhead of a run's ``perf:`` line (runs with tracking off log nothing)."""
    found = PERF.search(stdout)
    if found is None:
        raise SystemExit(f"no perf line in the run's output:\n{stdout[-2000:]}")
    return {"step": float(found[1]), "compute": float(found[2]), "overhead": float(found[3]), "wall": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/sine-maml.yaml"))
    ap.add_argument("--steps", type=int, default=3000, help="meta-steps of each run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300, help="empty steps per floor measurement")
    ap.add_argument("--margin-ms", type=float, default=1.0, help="the target: overhead <= floor + this")
    ap.add_argument("--variants", action="store_true", help="also system metrics off, and tracking off")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for every run")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from learners.params import ParamSpec
    from orchestrator.build import build_algorithm
    from orchestrator.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.workers.mode != "ray":
        raise SystemExit("the config trains in-process (workers.mode); this measures Ray's overhead")
    params = build_algorithm(cfg).init_params(0)
    numel, shares = ParamSpec.of(params).numel, cfg.workers.share_count
    variants = {"tracked": []}
    if args.variants:
        variants.update({"system metrics off": ["tracking.system_metrics=false"], "tracking off":
                         ["tracking.enabled=false"]})
    print(f"{args.config}: {cfg.workers.num_workers} Ray workers, {shares} shares, θ {numel} floats, {args.steps} "
          f"steps per run, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; ms per step, medians "
          "after the first tenth of the steps")
    print(f"{'round':<7}{'run':<20}{'step':>8}{'compute':>9}{'overhead':>10}{'floor':>8}{'above floor':>13}"
          f"{'wall/step':>11}  target: overhead <= floor + {args.margin_ms:g}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(args.rounds):
            for label, sets in variants.items():
                before = floor(numel, args.calls, shares)
                name, stdout = train(folder, Path(args.config).resolve(), args.steps, [*args.overrides, *sets])
                after = floor(numel, args.calls, shares)
                m = logged(folder, name) if label != "tracking off" else printed(stdout)
                base = (before + after) / 2
                ok = "yes" if m["overhead"] <= base + args.margin_ms else "NO"
                print(f"{r + 1:<7}{label:<20}{m['step']:>8.2f}{m['compute']:>9.2f}{m['overhead']:>10.2f}"
                      f"{base:>8.2f}{m['overhead'] - base:>13.2f}{m['wall']:>11.2f}  {ok} (floor {before:.2f} "
                      f"before, {after:.2f} after)", flush=True)


if __name__ == "__main__":
    main()
