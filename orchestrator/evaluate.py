"""Evaluation on held-out tasks: query loss (and accuracy) after 0..k adaptation steps, mean ± 95% CI.

Evaluation episodes are fixed by ``eval.seed`` (their own seed stream), so
every run and every algorithm is scored on the same tasks. The work is spread
over the worker group like training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orchestrator.config import Config
from orchestrator.group import LocalGroup, WorkerGroup
from tasks.episode import EpisodeIds, Purpose

Results = dict[str, dict[str, dict[int, "Score"]]]  # {evaluation: {metric: {adaptation steps: Score}}}


@dataclass(frozen=True)
class Score:
    mean: float
    ci95: float  # half-width of the normal 95% confidence interval of the mean
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis and the half-width of its normal 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    half = 1.96 * values.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(values.shape[1:], np.nan)
    return values.mean(0), half


def score(values: np.ndarray) -> Score:
    mean, half = mean_ci(values)
    return Score(float(mean), float(half), len(values))


def evaluate(cfg: Config, group: LocalGroup | WorkerGroup, theta: np.ndarray, probe: str | None = None) -> dict[str, np.ndarray]:
    """Per-task curves ``{metric: [tasks, max(eval.steps) + 1]}`` on the held-out tasks (of ``probe``)."""
    e = cfg.eval
    ids = EpisodeIds(e.seed, 0, tuple(range(e.tasks)), Purpose.EVAL)
    shares = ids.split(math.ceil(e.tasks / e.batch_tasks))
    lr = e.inner_lr or cfg.algorithm.inner_lr
    parts = group.evaluate(theta, shares, max(e.steps), lr, probe)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(curves: dict[str, np.ndarray], steps: list[int]) -> dict[str, dict[int, Score]]:
    """``{metric: {steps: Score}}`` for the requested step counts."""
    return {m: {s: score(v[:, s]) for s in steps} for m, v in curves.items()}


def evaluate_all(cfg: Config, group: LocalGroup | WorkerGroup, theta: np.ndarray):
    """Summaries ``{evaluation: {metric: {steps: Score}}}`` and the per-task curves behind them, for the
    task itself (``"test"``) and every probe in ``eval.probes``."""
    curves = {"test": evaluate(cfg, group, theta)}
    for name in cfg.eval.probes:
        curves[name] = evaluate(cfg, group, theta, name)
    return {ev: summarize(c, cfg.eval.steps) for ev, c in curves.items()}, curves


def table(label: str, results: dict[str, dict[str, dict[int, Score]]]) -> str:
    """A plain-text table: one row per (evaluation, metric), one column per step count."""
    lines = []
    for evaluation, metrics in results.items():
        for metric, by_step in metrics.items():
            cells = "  ".join(f"{s:>3} steps: {by_step[s]}" for s in by_step)
            n = next(iter(by_step.values())).n
            lines.append(f"{label:<12} {evaluation:<14} {metric:<5} (n={n})  {cells}")
    return "\n".join(lines)


def to_json(results: dict[str, dict[str, dict[int, Score]]]) -> dict:
    return {ev: {m: {str(s): {"mean": sc.mean, "ci95": sc.ci95, "n": sc.n} for s, sc in bs.items()}
                 for m, bs in ms.items()} for ev, ms in results.items()}
