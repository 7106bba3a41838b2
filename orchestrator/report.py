"""Evaluating a θ on the held-out tasks and reporting it: the terminal table, a JSON file, MLflow metrics, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from learners.algorithm import Algorithm
from learners.params import ParamSpec
from orchestrator import plots
from orchestrator.atomic import write_atomic
from orchestrator.build import build_tasks
from orchestrator.config import Config, SineTaskConfig
from orchestrator.evaluate import Results, evaluate_all, mean_ci, table, to_json
from orchestrator.group import LocalGroup, WorkerGroup


def evaluate_and_report(cfg: Config, algorithm: Algorithm, group: LocalGroup | WorkerGroup, theta: np.ndarray,
                        tracker, step: int, out_dir: Path, out, name: str = "eval.json"
                        ) -> tuple[Results, dict[str, dict[str, np.ndarray]]]:
    """Score ``theta`` on every evaluation (the task and its probes); print, save, track. Returns the summaries
    and the per-task curves behind them."""
    results, curves = evaluate_all(cfg, group, theta)
    print(table(algorithm.name, results), file=out)
    # `metaray eval` writes a file of its own: the training run's eval.json is never overwritten.
    write_atomic(out_dir / name, json.dumps(to_json(results), indent=2))
    summary = {}
    for ev, metrics in results.items():
        for m, by_step in metrics.items():
            for s, sc in by_step.items():
                summary[f"eval/{ev}/{m}_step{s}"] = sc.mean
                summary[f"eval/{ev}/{m}_step{s}_ci95"] = sc.ci95
    tracker.log_metrics(summary, step)
    # The whole curve, with the MLflow step = number of adaptation steps: MLflow's charts and compare
    # view then plot loss vs adaptation steps across runs.
    for ev, per_metric in curves.items():
        for m, per_task in per_metric.items():
            for k, value in enumerate(per_task.mean(0)):
                tracker.log_metrics({f"eval/{ev}/{m}_curve": float(value)}, k)
    if cfg.tracking.plots:
        _log_plots(cfg, algorithm, theta, tracker, curves)
    return results, curves


def _log_plots(cfg: Config, algorithm: Algorithm, theta: np.ndarray, tracker, curves) -> None:
    lines = {f"this run ({algorithm.name})": mean_ci(curves["test"]["loss"])}
    for name, values in tracker.sibling_curves("eval/test/loss_curve").items():
        lines.setdefault(name, (np.asarray(values), None))
    tracker.log_figure(plots.adaptation_plot(lines, f"{cfg.task.family}: held-out query loss"), "loss_vs_steps")
    if isinstance(cfg.task, SineTaskConfig):
        params = ParamSpec.of(algorithm.init_params(0)).unflatten(torch.from_numpy(theta.copy()))
        lr = cfg.eval.inner_lr or cfg.algorithm.inner_lr
        steps = tuple(sorted(set(cfg.eval.steps)))
        for name, task in [("test", cfg.task)] + [(p, cfg.probe_task(p)) for p in cfg.eval.probes]:
            fig = plots.sine_fits(algorithm, params, build_tasks(task), cfg.eval.seed, steps, lr)
            tracker.log_figure(fig, f"sine_fits_{name}")
