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


@dataclass(frozen=True)
class Score:
    mean: float
    ci95: float  # half-width of the normal 95% confidence interval of the mean
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


def score(values: np.ndarray) -> Score:
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    half = 1.96 * values.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return Score(float(values.mean()), float(half), n)


def evaluate(cfg: Config, group: LocalGroup | WorkerGroup, theta: np.ndarray, probe: str | None = None) -> dict[str, np.ndarray]:
    """Per-task curves ``{metric: [tasks, max(eval.steps) + 1]}`` on the held-out tasks (of ``probe``)."""
    e = cfg.eval
    ids = EpisodeIds(e.seed, 0, tuple(range(e.tasks)), Purpose.EVAL)
    shares = ids.split(math.ceil(e.tasks / e.batch_tasks))
    lr = e.inner_lr or cfg.algorithm.inner_lr
    parts = group.map("evaluate", theta, shares, max(e.steps), lr, probe)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(curves: dict[str, np.ndarray], steps: list[int]) -> dict[str, dict[int, Score]]:
    """``{metric: {steps: Score}}`` for the requested step counts."""
    return {m: {s: score(v[:, s]) for s in steps} for m, v in curves.items()}


def evaluate_all(cfg: Config, group: LocalGroup | WorkerGroup, theta: np.ndarray) -> dict[str, dict[str, dict[int, Score]]]:
    """Summaries for the task itself (``"test"``) and for every probe in ``eval.probes``."""
    out = {"test": summarize(evaluate(cfg, group, theta), cfg.eval.steps)}
    for name in cfg.eval.probes:
        out[name] = summarize(evaluate(cfg, group, theta, name), cfg.eval.steps)
    return out


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
