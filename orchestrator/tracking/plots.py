"""The figures a run logs: learning curves, loss vs adaptation steps, and sine fits before/after adaptation.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no
global backend state), so they render headless anywhere.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib.figure import Figure

from learners.algorithm import Algorithm
from learners.inner_loop import fine_tuning_rule, inner_step
from learners.params import Params
from tasks.episode import EpisodeIds, Purpose
from tasks.sine import SineTasks


def learning_curves(history: dict[str, list[float]], first_step: int, window: int = 100) -> Figure:
    """Query loss before/after adaptation (and accuracy) per meta-step, smoothed by a running mean.

    Metrics that a run never produced (every step skipped: no loss at all) leave their panel out; with
    nothing to draw, the figure says why instead of failing after a finished training run.
    """
    losses = [k for k in ("inner/loss_before", "inner/loss_after") if history.get(k)]
    losses = losses or [k for k in ("meta/loss",) if history.get(k)]
    panels = [(losses, "query loss", True)] if losses else []
    acc = [k for k in ("inner/acc_before", "inner/acc_after") if history.get(k)]
    if acc:
        panels.append((acc, "query accuracy", False))
    if not panels:
        skipped = history.get("orchestrator/skipped_steps") or [0]
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no meta-step gave a finite query loss ({int(skipped[-1])} steps skipped)",
                ha="center", va="center")
        return fig
    n = min(len(history[k]) for keys, _, _ in panels for k in keys)
    w = max(1, min(window, n // 10))
    fig = Figure(figsize=(5 * len(panels) + 1, 4), layout="constrained")
    for ax, (keys, ylabel, log) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for k in keys:
            smooth = np.convolve(np.asarray(history[k], dtype=float), np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(smooth)) + first_step + w - 1, smooth, label=k)  # a window ends at its step
        ax.set_xlabel("meta-step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(fitted(f"meta-training: query loss of each meta-batch, running mean over {w} meta-steps",
                        fig.get_figwidth()))
    return fig


def adaptation_plot(curves: dict[str, tuple[np.ndarray, np.ndarray | None]], title: str) -> Figure:
    """Mean query loss vs number of adaptation steps, one line per label (with 95% CI bands where given)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, (mean, ci) in curves.items():
        _line_with_band(ax, np.asarray(mean, dtype=float), ci, label, marker="o", ms=3)
    ax.set_xlabel("gradient steps on the support set")
    ax.set_ylabel("query loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(fitted(title, ax.get_position().width * fig.get_figwidth()))
    return fig


def evaluation_curves(summaries: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], title: str) -> Figure:
    """Each metric (a panel) vs adaptation steps, one line per evaluation (the task, each probe), with the
    95% CI of the mean as a band; diverged tasks are already left out of ``summaries``."""
    metrics = list(dict.fromkeys(m for per_metric in summaries.values() for m in per_metric))
    fig = Figure(figsize=(5 * len(metrics) + 1, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for evaluation, per_metric in summaries.items():
            if metric in per_metric:
                mean, ci = per_metric[metric]
                _line_with_band(ax, mean, ci, evaluation, marker="o", ms=3)
        ax.set_xlabel("gradient steps on the support set")
        ax.set_ylabel(f"query {metric}")
        if metric == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(fitted(title, fig.get_figwidth()))
    return fig


def fitted(title: str, width_in: float, fontsize: float = 12.0) -> str:
    """``title`` broken into lines no wider than ``width_in`` inches, so that no figure cuts it off (a glyph
    of matplotlib's default font is at most ~0.6 em wide on average over a line of text)."""
    return "\n".join(textwrap.wrap(title, max(16, int(width_in * 72 / (0.6 * fontsize)))))


def _line_with_band(ax, mean: np.ndarray, ci: np.ndarray | None, label: str, **style) -> None:
    steps = np.arange(len(mean))
    line = ax.plot(steps, mean, label=label, **style)[0]
    if ci is not None:
        ci = np.nan_to_num(np.asarray(ci, dtype=float), nan=0.0)  # no band where it is unknown
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2, color=line.get_color())


def sine_fits(algorithm: Algorithm, params: Params, source: SineTasks, seed: int, steps: tuple[int, ...],
              lr: float, n_tasks: int = 6) -> Figure:
    """Held-out sine tasks: support points, ground truth, and the model after each number of adaptation steps."""
    ids = EpisodeIds(seed, 0, tuple(range(n_tasks)), Purpose.EVAL)
    batch = source.sample(ids)
    truth = source.task_parameters(ids)
    x = np.linspace(*source.x_range, 200)
    grid = torch.tensor(x, dtype=torch.float32)[:, None]
    fig = Figure(figsize=(12, 6), layout="constrained")
    axes = fig.subplots(2, (n_tasks + 1) // 2).ravel()
    rule = fine_tuning_rule(algorithm, lr)
    for i, ax in enumerate(axes[:n_tasks]):
        sx, sy = batch.support_x[i], batch.support_y[i]
        start = {k: v.detach() for k, v in algorithm.start(params, sx, sy).items()}
        ax.plot(x, SineTasks.curve(truth[i], x), "k-", lw=2, label="ground truth")
        task, done = start, 0
        for s in sorted(steps):
            for step in range(done, s):  # the algorithm's own rule (learned rates), step by step
                task = inner_step(algorithm.predict, algorithm.objective, start, task, algorithm.tunable(start),
                                  sx, sy, step, rule, first_order=True)
                task = {k: v.detach() for k, v in task.items()}
            done = s
            with torch.no_grad():
                ax.plot(x, algorithm.predict(task, grid)[:, 0].numpy(), "--" if s == 0 else "-",
                        label=f"after {s} step{'s' if s != 1 else ''}")
        ax.plot(sx[:, 0].numpy(), sy[:, 0].numpy(), "^", color="tab:red", label="support")
        ax.set_title(f"A={truth[i, 0]:.2f}, phase={truth[i, 1]:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{algorithm.name}: held-out sine tasks, K={batch.support_x.shape[1]}")
    return fig
