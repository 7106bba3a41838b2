"""Sweeps: several configs (and/or a grid of --set values) as sibling MLflow runs under one parent run.

    metaray sweep configs/sine-*.yaml --set outer.steps=5000
    metaray sweep configs/sine-maml.yaml --grid 'algorithm.inner_lr=[0.001, 0.01, 0.1]'

Every child run is a normal ``train`` run, nested under the parent
(``mlflow.parentRunId``) in one experiment, so MLflow's compare view shows them
side by side. The parent gets the comparison figure (held-out loss vs
adaptation steps, every child) and a results table. All configs are validated
before the first one starts.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import yaml

from orchestrator import plots
from orchestrator.config import Config, ConfigError, load_config
from orchestrator.run import train
from orchestrator.tracking import experiment_name, open_tracker


def expand(paths: list[str], overrides: list[str], grid: list[str], experiment: str | None,
           sweep_dir: Path) -> list[Config]:
    axes = []
    for item in grid:
        key, sep, raw = item.partition("=")
        values = yaml.safe_load(raw) if sep else None
        if not sep or not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {item!r}: expected key=[v1, v2, ...], e.g. --grid 'outer.lr=[0.001, 0.01]'")
        axes.append([(key, v) for v in values])
    configs, errors = [], []
    for path in paths:
        for combo in itertools.product(*axes):
            suffix = "".join(f"_{k.split('.')[-1]}-{v}" for k, v in combo)
            try:
                base = load_config(path, overrides)
                sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in combo]
                cfg = load_config(path, [*overrides, *sets, f"run.dir={sweep_dir}",
                                         f"run.name={base.run.name}{suffix}",
                                         f"tracking.experiment={experiment or experiment_name(base)}"])
                configs.append(cfg)
            except ConfigError as e:
                errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    names = [c.run.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep runs need distinct run.name values, got {names}")
    return configs


def sweep(paths: list[str], overrides: list[str] = (), grid: list[str] = (), experiment: str | None = None,
          name: str | None = None, out=sys.stdout) -> str | None:
    """Train every expanded config as a child of one parent run; return the parent run id."""
    name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    first = load_config(paths[0], overrides) if paths else None
    if first is None:
        raise ConfigError("sweep needs at least one config file")
    sweep_dir = Path(first.run.dir) / name
    configs = expand(paths, list(overrides), list(grid), experiment, sweep_dir)
    parent_cfg = configs[0].model_copy(update={"run": configs[0].run.model_copy(update={"name": name})})
    parent = open_tracker(parent_cfg, command="sweep", run_dir=sweep_dir)
    status = "FAILED"
    try:
        parent.log_params({"sweep.configs": list(paths), "sweep.grid": list(grid), "sweep.overrides": list(overrides),
                           "sweep.runs": [c.run.name for c in configs]})
        curves, rows = {}, []
        for i, cfg in enumerate(configs):
            print(f"== sweep {name}: run {i + 1}/{len(configs)}: {cfg.run.name}", file=out, flush=True)
            result = train(cfg, out=out, parent_run_id=parent.run_id)
            test = result.results.get("test", {}).get("loss", {})
            rows.append((cfg.run.name, cfg.algorithm.name, test))
            if result.test_curve is not None:
                curves[cfg.run.name] = result.test_curve
        table = _table(rows)
        print(table, file=out)
        table_path = sweep_dir / "sweep_results.md"
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(table + "\n")
        parent.log_artifact(table_path)
        if curves:
            parent.log_figure(plots.adaptation_plot(curves, f"sweep {name}: held-out query loss"), "loss_vs_steps")
        status = "FINISHED"
        return parent.run_id
    finally:
        parent.close(status)


def _table(rows) -> str:
    steps = sorted({s for _, _, t in rows for s in t})
    head = "| run | algorithm | " + " | ".join(f"loss after {s} steps" for s in steps) + " |"
    lines = [head, "|" + "---|" * (2 + len(steps))]
    for run, alg, t in rows:
        lines.append(f"| {run} | {alg} | " + " | ".join(str(t[s]) if s in t else "" for s in steps) + " |")
    return "\n".join(lines)
