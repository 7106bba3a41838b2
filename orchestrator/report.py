"""Evaluating a θ on the held-out tasks and reporting it: the terminal table, a JSON file, MLflow metrics,
a results table with the 95% CIs (``eval/results.csv``), and plots with CI bands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from learners.algorithm import Algorithm
from learners.params import ParamSpec
from orchestrator import plots
from orchestrator.atomic import write_atomic
from orchestrator.build import build_tasks
from orchestrator.config import Config
from orchestrator.task_config import SineTaskConfig
from orchestrator.evaluate import Results, curve_summaries, evaluate_all, table, to_csv, to_json
from orchestrator.group import LocalGroup, WorkerGroup

EVAL_FILE = "eval.json"  # a training run's test results, beside its checkpoint


def evaluate_and_report(cfg: Config, algorithm: Algorithm, group: LocalGroup | WorkerGroup, theta: np.ndarray,
                        tracker, step: int, out_dir: Path, out, name: str = EVAL_FILE
                        ) -> tuple[Results, dict[str, dict[str, np.ndarray]]]:
    """Score ``theta`` on every evaluation (the task and its probes); print, save, track. Returns the summaries
    and the per-task curves behind them."""
    results, curves = evaluate_all(cfg, group, theta)
    print(table(algorithm.name, results), file=out)
    # `metaray eval` writes a file of its own: the training run's eval.json is never overwritten.
    write_atomic(out_dir / name, json.dumps(to_json(results), indent=2))
    tracker.log_evaluation(summary_metrics(results), step)
    tracker.log_text(to_csv(results), "eval/results.csv")
    # The whole curve, with the MLflow step = number of adaptation steps: MLflow's charts and compare
    # view then plot loss vs adaptation steps across runs.
    summaries = {ev: curve_summaries(per_metric) for ev, per_metric in curves.items()}
    by_k: dict[int, dict[str, float]] = {}
    for ev, per_metric in summaries.items():
        for m, (mean, _) in per_metric.items():
            for k, value in enumerate(mean):
                if np.isfinite(value):  # every task diverged there: the count says so, no NaN point
                    by_k.setdefault(k, {})[f"eval/{ev}/{m}_curve"] = float(value)
    for k, metrics in sorted(by_k.items()):
        tracker.log_metrics(metrics, k)
    if cfg.tracking.plots:
        _log_plots(cfg, algorithm, theta, tracker, summaries)
    return results, curves


def summary_metrics(results: Results) -> dict[str, float]:
    """``eval/<evaluation>/<metric>_step<k>`` (mean), ``..._ci95`` and ``eval/<evaluation>/diverged_step<k>``
    (tasks left out). A value that does not exist (every task diverged, a CI of one task) is not logged."""
    summary = {}
    for ev, metrics in results.items():
        for m, by_step in metrics.items():
            for s, sc in by_step.items():
                if math.isfinite(sc.mean):
                    summary[f"eval/{ev}/{m}_step{s}"] = sc.mean
                if math.isfinite(sc.ci95):
                    summary[f"eval/{ev}/{m}_step{s}_ci95"] = sc.ci95
        for s, sc in next(iter(metrics.values())).items():
            summary[f"eval/{ev}/diverged_step{s}"] = float(sc.diverged)
    return summary


def _log_plots(cfg: Config, algorithm: Algorithm, theta: np.ndarray, tracker, summaries) -> None:
    lines = {f"this run ({algorithm.name})": summaries["test"]["loss"]}
    for name, values in tracker.sibling_curves("eval/test/loss_curve").items():
        lines.setdefault(name, (np.asarray(values), None))
    tracker.log_figure(plots.adaptation_plot(lines, f"{cfg.task.family}: held-out query loss"), "loss_vs_steps")
    tracker.log_figure(plots.evaluation_curves(summaries, f"{algorithm.name}: held-out tasks, mean and 95% CI"),
                       "eval_curves")
    if isinstance(cfg.task, SineTaskConfig):
        params = ParamSpec.of(algorithm.init_params(0)).unflatten(torch.from_numpy(theta.copy()))
        lr = cfg.eval.inner_lr or cfg.algorithm.inner_lr
        steps = tuple(sorted(set(cfg.eval.steps)))
        for name, task in [("test", cfg.task)] + [(p, cfg.probe_task(p)) for p in cfg.eval.probes]:
            fig = plots.sine_fits(algorithm, params, build_tasks(task), cfg.eval.seed, steps, lr)
            tracker.log_figure(fig, f"sine_fits_{name}")
