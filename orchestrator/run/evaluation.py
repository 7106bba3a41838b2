"""Evaluation on held-out tasks: query loss (and accuracy) after 0..k adaptation steps, mean ± 95% CI, and its
report: the terminal table, a JSON file, MLflow metrics, a results table (``eval/results.csv``), plots.

Evaluation episodes are fixed by ``eval.seed`` (their own seed stream), so
every run and every algorithm is scored on the same tasks. The work is spread
over the worker group like training. A task whose query loss is not finite after
k steps, or more than ``BLOWUP`` times its loss before adapting, has diverged: it is counted, said in
words, and left out of the means at k (one NaN would make the mean NaN; one task at 1e33, finite but
diverged all the same, would make it meaningless).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learners.algorithm import Algorithm
from learners.params import ParamSpec
from orchestrator.atomic import write_atomic
from orchestrator.build import build_tasks
from orchestrator.config import Config
from orchestrator.config.task import SineTaskConfig
from orchestrator.run.divergence import FACTOR as DIVERGED_FACTOR
from orchestrator.tracking import plots
from orchestrator.workers.group import Group
from tasks.episode import EpisodeIds, Purpose

Results = dict[str, dict[str, dict[int, "Score"]]]  # {evaluation: {metric: {adaptation steps: Score}}}
BLOWUP = 1e6  # a million times worse than before adapting is divergence on the way to overflow, not a bad fit
EVAL_FILE = "eval.json"  # a training run's test results, beside its checkpoint


@dataclass(frozen=True)
class Score:
    mean: float
    ci95: float  # half-width of the normal 95% confidence interval of the mean
    n: int  # tasks in the mean
    diverged: int = 0  # tasks left out: their query loss after this many steps was not finite or blew up

    def __str__(self) -> str:
        if self.n == 0:
            return "all diverged"
        if not math.isfinite(self.ci95):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis and the half-width of its normal 95% confidence interval, over the finite
    entries of each column (a diverged task is left out, not averaged in); NaN where too few are finite."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    n = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # columns with 0 or 1 finite entries
        mean = np.where(ok, values, 0.0).sum(0) / n
        var = (np.where(ok, values - mean, 0.0) ** 2).sum(0) / (n - 1)
        half = 1.96 * np.sqrt(var) / np.sqrt(n)
    return np.where(n > 0, mean, np.nan), np.where(n > 1, half, np.nan)


def diverged(curves: dict[str, np.ndarray]) -> np.ndarray:
    """``[tasks, steps + 1]``: True where a task's query loss after that many steps is not finite or more than
    ``BLOWUP`` times its loss before adapting (its other metrics there, e.g. the accuracy of NaN logits, mean
    nothing either)."""
    if "loss" not in curves:
        return ~np.logical_and.reduce([np.isfinite(v) for v in curves.values()])
    loss = np.asarray(curves["loss"], dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return ~np.isfinite(loss) | (loss > BLOWUP * np.maximum(loss[:, :1], np.finfo(np.float64).tiny))


def curve_summaries(curves: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{metric: (mean, 95% CI half-width)}`` per number of adaptation steps, diverged tasks left out."""
    bad = diverged(curves)
    return {m: mean_ci(np.where(bad, np.nan, v)) for m, v in curves.items()}


def evaluate(cfg: Config, group: Group, theta: np.ndarray, probe: str | None = None) -> dict[str, np.ndarray]:
    """Per-task curves ``{metric: [tasks, max(eval.steps) + 1]}`` on the held-out tasks (of ``probe``)."""
    e = cfg.eval
    ids = EpisodeIds(e.seed, 0, tuple(range(e.tasks)), Purpose.EVAL)
    shares = ids.split(math.ceil(e.tasks / e.batch_tasks))
    lr = e.inner_lr or cfg.algorithm.inner_lr
    parts = group.evaluate(theta, shares, max(e.steps), lr, probe)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(curves: dict[str, np.ndarray], steps: list[int]) -> dict[str, dict[int, Score]]:
    """``{metric: {steps: Score}}`` for the requested step counts."""
    bad = diverged(curves)
    total = len(bad)
    out = {}
    for m, (mean, ci) in curve_summaries(curves).items():
        out[m] = {s: Score(float(mean[s]), float(ci[s]), total - int(bad[:, s].sum()), int(bad[:, s].sum()))
                  for s in steps}
    return out


def evaluate_all(cfg: Config, group: Group, theta: np.ndarray):
    """Summaries ``{evaluation: {metric: {steps: Score}}}`` and the per-task curves behind them, for the
    task itself (``"test"``) and every probe in ``eval.probes``."""
    curves = {"test": evaluate(cfg, group, theta)}
    for name in cfg.eval.probes:
        curves[name] = evaluate(cfg, group, theta, name)
    return {ev: summarize(c, cfg.eval.steps) for ev, c in curves.items()}, curves


def table(label: str, results: dict[str, dict[str, dict[int, Score]]]) -> str:
    """A plain-text table: one row per (evaluation, metric), one column per step count, then one line per
    evaluation saying how many tasks diverged (they are left out of the means)."""
    lines = []
    for evaluation, metrics in results.items():
        for metric, by_step in metrics.items():
            cells = "  ".join(f"{s:>3} steps: {by_step[s]}" for s in by_step)
            first = next(iter(by_step.values()))
            lines.append(f"{label:<12} {evaluation:<14} {metric:<5} (n={first.n + first.diverged})  {cells}")
        note = divergence(next(iter(metrics.values())))
        if note:
            lines.append(f"{'':<12} {evaluation:<14} {note} (left out of the means)")
    return "\n".join(lines)


def divergence(by_step: dict[int, Score]) -> str:
    """E.g. "12 of 600 held-out tasks diverged at 10 steps, 30 at 20 steps"; "" if none did."""
    parts = [(s, sc.diverged, sc.n + sc.diverged) for s, sc in by_step.items() if sc.diverged]
    if not parts:
        return ""
    (s, d, total), rest = parts[0], parts[1:]
    words = [f"{d} of {total} held-out tasks diverged at {_steps(s)}"] + [f"{d} at {_steps(s)}" for s, d, _ in rest]
    return ", ".join(words)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def to_json(results: dict[str, dict[str, dict[int, Score]]]) -> dict:
    """JSON that any reader takes: a mean or CI that does not exist (every task diverged) is null, not NaN."""
    return {ev: {m: {str(s): {"mean": finite_or_none(sc.mean), "ci95": finite_or_none(sc.ci95), "n": sc.n,
                              "diverged": sc.diverged}
                     for s, sc in bs.items()} for m, bs in ms.items()} for ev, ms in results.items()}


def from_json(saved: dict) -> Results:
    """``to_json``'s inverse."""
    return {ev: {m: {int(s): Score(**{k: math.nan if v is None else v for k, v in sc.items()})
                     for s, sc in bs.items()} for m, bs in ms.items()} for ev, ms in saved.items()}


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def to_csv(results: dict[str, dict[str, dict[int, Score]]]) -> str:
    """One row per evaluation, metric and step count: the mean with its 95% CI (MLflow shows CSV as a table)."""
    rows = ["evaluation,metric,adaptation_steps,mean,ci95,ci95_low,ci95_high,tasks,diverged"]
    for ev, ms in results.items():
        for m, bs in ms.items():
            for s, sc in bs.items():
                rows.append(f"{ev},{m},{s},{sc.mean:.6g},{sc.ci95:.6g},{sc.mean - sc.ci95:.6g},{sc.mean + sc.ci95:.6g},"
                            f"{sc.n},{sc.diverged}")
    return "\n".join(rows) + "\n"


def evaluate_and_report(cfg: Config, algorithm: Algorithm, group: Group, theta: np.ndarray,
                        tracker, step: int, out_dir: Path, out, name: str = EVAL_FILE
                        ) -> tuple[Results, dict[str, dict[str, np.ndarray]]]:
    """Score ``theta`` on every evaluation (the task and its probes); print, save, track. Returns the summaries
    and the per-task curves behind them."""
    results, curves = evaluate_all(cfg, group, theta)
    print(table(algorithm.name, results), file=out)
    # `metaray eval` writes a file of its own: the training run's eval.json is never overwritten.
    write_atomic(out_dir / name, json.dumps(to_json(results), indent=2, allow_nan=False))
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
    """``eval/<evaluation>/<metric>_step<k>`` (mean), ``..._ci95`` and, when any task of that evaluation diverged,
    ``eval/<evaluation>/diverged_step<k>`` (tasks left out; zeros would only be empty charts in MLflow, and
    eval/results.csv has them). A value that does not exist (every task diverged, a CI of one task) is not logged."""
    summary = {}
    for ev, metrics in results.items():
        for m, by_step in metrics.items():
            for s, sc in by_step.items():
                if math.isfinite(sc.mean):
                    summary[f"eval/{ev}/{m}_step{s}"] = sc.mean
                if math.isfinite(sc.ci95):
                    summary[f"eval/{ev}/{m}_step{s}_ci95"] = sc.ci95
        counts = {s: sc.diverged for s, sc in next(iter(metrics.values())).items()}
        if any(counts.values()):
            summary.update({f"eval/{ev}/diverged_step{s}": float(n) for s, n in counts.items()})
    return summary


def comparable(own: np.ndarray, others: dict[str, list[float]]) -> tuple[dict[str, np.ndarray], int]:
    """The other runs' curves worth drawing beside ``own`` (a loss per adaptation step), and how many are left out:
    a curve that is not finite, or that rises above ``DIVERGED_FACTOR`` times this run's loss before adapting,
    diverged, and would only stretch the axis."""
    finite = own[np.isfinite(own)]
    ceiling = DIVERGED_FACTOR * float(finite[0]) if finite.size else np.inf
    kept = {}
    for name, values in others.items():
        values = np.asarray(values, dtype=float)
        if values.size and np.all(np.isfinite(values)) and values.max() <= ceiling:
            kept[name] = values
    return kept, len(others) - len(kept)


def _log_plots(cfg: Config, algorithm: Algorithm, theta: np.ndarray, tracker, summaries) -> None:
    own = summaries["test"]["loss"]
    others, left_out = comparable(own[0], tracker.sibling_curves("eval/test/loss_curve"))
    lines = {f"this run ({algorithm.name})": own, **{k: (v, None) for k, v in others.items()}}
    title = f"{cfg.task.family}: held-out query loss" + (f" ({left_out} diverged runs left out)" if left_out else "")
    tracker.log_figure(plots.adaptation_plot(lines, title), "loss_vs_steps")
    tracker.log_figure(plots.evaluation_curves(summaries, f"{algorithm.name}: held-out tasks, mean and 95% CI"),
                       "eval_curves")
    if isinstance(cfg.task, SineTaskConfig):
        params = ParamSpec.of(algorithm.init_params(0)).unflatten(torch.from_numpy(theta.copy()))
        lr = cfg.eval.inner_lr or cfg.algorithm.inner_lr
        steps = tuple(sorted(set(cfg.eval.steps)))
        for name, task in [("test", cfg.task)] + [(p, cfg.probe_task(p)) for p in cfg.eval.probes]:
            fig = plots.sine_fits(algorithm, params, build_tasks(task), cfg.eval.seed, steps, lr)
            tracker.log_figure(fig, f"sine_fits_{name}")
