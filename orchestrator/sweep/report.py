"""What a finished sweep tells the user: per-trial outcomes, the best trial, the results table, the
comparison plot, the sweep's parent MLflow run, and progress lines while it runs.

The parent run gets the best trial's swept values (params ``best.<key>``), its resolved config
(``best_config.yaml``) and the numbers the sweep compared it by, under the same names as in the child so the
runs table lines them up: the sweep metric at each of its reports (the mean over each report's window, the
value in the results table last), its evaluation results at step 0 (drawn as bars) and its adaptation curves
(``eval/*/*_curve``, step = adaptation steps); counts of completed, stopped, failed and diverged trials
(``sweep/*``); the results table
``sweep_results.md`` (one column per swept key); and ``plots/sweep_comparison.png``: the sweep metric over
meta-steps and the held-out loss over adaptation steps, one line per trial, where a diverged trial is
drawn up to the top of the axes and marked instead of stretching them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from orchestrator.atomic import write_atomic
from orchestrator.config import parse_config
from orchestrator.errors import one_line
from orchestrator.sweep.plan import Plan
from orchestrator.tracking.store import resolve_uri

# A curve that exceeds its sweep's typical starting value this many times over has diverged.
DIVERGED_FACTOR = 1e3
HELD_OUT = "eval/test/loss_curve"


@dataclass
class TrialOutcome:
    name: str
    swept: dict[str, Any]
    config: dict[str, Any]  # resolved, as JSON
    status: str  # completed | stopped early | diverged | failed | unfinished
    step: int  # meta-steps done at the last report
    metric: float | None  # the sweep metric at the last report (over its window)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) at every report
    error: str | None = None
    run_id: str | None = None  # the child MLflow run
    metrics: dict[str, float] = field(default_factory=dict)  # the child run's latest metrics (eval/* included)
    curves: dict[str, list[float]] = field(default_factory=dict)  # eval/*/*_curve by adaptation steps 0, 1, ...
    node: str = ""  # the address of the node the trial ran on (its last report)
    run_status: str | None = None  # the child MLflow run's status when the sweep ended

    @property
    def diverged(self) -> bool:
        return self.status == "diverged" or any(not math.isfinite(v) for _, v in self.curve)

    @property
    def held_out(self) -> list[float]:
        """Held-out query loss after 0, 1, ... adaptation steps."""
        return self.curves.get(HELD_OUT, [])


def _name(trial) -> str:
    return trial.config["trial"]["name"]


def trial_error(trial) -> str:
    """A failed Tune trial's own exception, on one line."""
    error = trial.get_pickled_error()
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the trial's own exception
    if cause is None:
        text = trial.get_error() or "unknown error"
        return one_line(Exception(text.strip().splitlines()[-1]))
    return f"{type(cause).__name__}: {one_line(cause)}"


def outcomes(analysis, plan: Plan, parent_run_id: str | None) -> list[TrialOutcome]:
    """Every trial of ``plan`` as Tune last saved it, with its child MLflow run's metrics."""
    by_name = {_name(t): t for t in analysis.trials}
    frames = analysis.trial_dataframes
    metric = plan.settings["metric"]
    children = _children(plan, parent_run_id)
    out = []
    for spec in plan.trials:
        trial = by_name.get(spec.name)
        last = trial.last_result if trial is not None else {}
        step = int(last.get("step", 0))
        if trial is None or trial.status not in ("TERMINATED", "ERROR"):
            status = "unfinished"
        elif trial.status == "ERROR":
            status = "failed"
        elif last.get("diverged"):
            status = "diverged"
        else:
            status = "completed" if last.get("completed") else "stopped early"  # (its own early stopping: completed)
        frame = frames.get(trial.trial_id) if trial is not None else None
        curve = []
        if frame is not None and metric in frame and "step" in frame:
            curve = [(int(s), float(v)) for s, v in zip(frame["step"], frame[metric]) if not math.isnan(s)]
        run = children.get(spec.name, {})
        scores = {k: v for k, v in last.items() if k.startswith("eval/")}  # the last report's, when not tracked
        out.append(TrialOutcome(spec.name, spec.swept, spec.config.model_dump(mode="json"), status, step,
                                float(last[metric]) if metric in last else None, curve,
                                trial_error(trial) if status == "failed" else None, run.get("run_id"),
                                {**scores, **run.get("metrics", {})}, run.get("curves", {}),
                                str(last.get("node_ip", "")), run.get("status")))
    return out


RUN_STATUS = {"completed": "FINISHED", "stopped early": "FINISHED", "diverged": "FAILED", "failed": "FAILED",
              "unfinished": "KILLED"}


def settle_children(trials: list[TrialOutcome], plan: Plan) -> None:
    """Tag every child run with how its trial ended (``metaray.sweep.trial``); mark the runs of trials that an
    interruption left unfinished KILLED (``--resume`` continues them), and close a run its trial could not
    (Tune kills a trial still busy 10 s after a sweep ends)."""
    if not plan.first.tracking.enabled:
        return
    from mlflow import MlflowClient

    client = MlflowClient(resolve_uri(plan.first))
    for t in trials:
        if t.run_id is None:
            continue
        client.set_tag(t.run_id, "metaray.sweep.trial", t.status + (f" at step {t.step}" if t.status in (
            "stopped early", "unfinished") else ""))
        if t.run_status == "RUNNING" or t.status == "unfinished":
            client.set_terminated(t.run_id, RUN_STATUS[t.status])


def _children(plan: Plan, parent_run_id: str | None) -> dict[str, dict[str, Any]]:
    """The sweep's child runs by name: id, latest metrics, adaptation curves (``eval/*/*_curve``)."""
    cfg = plan.first
    if parent_run_id is None or not cfg.tracking.enabled:
        return {}
    from mlflow import MlflowClient

    client = MlflowClient(resolve_uri(cfg))
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000, order_by=["attributes.start_time DESC"])
    out = {}
    for r in runs:
        curves = {}
        for key in (k for k in r.data.metrics if k.startswith("eval/") and k.endswith("_curve")):
            by_step = {}  # a resumed run evaluated again: the latest value per step
            for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                by_step[m.step] = m.value
            curves[key] = [by_step[s] for s in sorted(by_step)]
        # Newest first (search order): should a trial have two runs, the one it ran last is its own.
        out.setdefault(r.info.run_name, {"run_id": r.info.run_id, "metrics": dict(r.data.metrics),
                                         "status": r.info.status, "curves": curves})
    return out


def best_trial(trials: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """The trial with the best final metric, among those that trained to the end when there are any."""
    scored = [t for t in trials if t.metric is not None and math.isfinite(t.metric) and t.status != "failed"]
    pool = [t for t in scored if t.status == "completed"] or scored
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda t: t.metric)


def results_table(trials: list[TrialOutcome], metric: str, mode: str) -> str:
    """Markdown, best first: run, one column per swept key, status, steps, the metric, held-out loss."""
    keys = list(dict.fromkeys(k for t in trials for k in t.swept))
    held = sorted({k for t in trials for k in t.metrics if k.startswith("eval/test/loss_step")
                   and not k.endswith("_ci95")}, key=lambda k: int(k.rsplit("step", 1)[1]))
    sign = 1 if mode == "min" else -1

    def order(t: TrialOutcome):
        finite = t.metric is not None and math.isfinite(t.metric)
        return (t.status == "failed", not finite, sign * t.metric if finite else 0.0)

    nodes = len({t.node for t in trials if t.node}) > 1
    head = ["run", *keys, "status", "steps", metric, *(f"held-out loss, {k.rsplit('step', 1)[1]} steps" for k in held),
            *(["node"] if nodes else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(trials, key=order):
        status = f"failed: {t.error}" if t.status == "failed" else t.status + (
            " (diverged)" if t.diverged and t.status != "diverged" else "")
        cells = [t.name, *(_cell(t.swept.get(k, "")) for k in keys), status, str(t.step),
                 _cell(t.metric), *(_cell(t.metrics.get(k)) for k in held), *([t.node] if nodes else [])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def comparison_plot(trials: list[TrialOutcome], metric: str, title: str) -> Figure:
    """The sweep metric per meta-step, and the held-out loss per adaptation step, one line per trial."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _curves(left, {t.name: ([s for s, _ in t.curve], [v for _, v in t.curve]) for t in trials if t.curve})
    left.set_xlabel("meta-step")
    left.set_ylabel(f"{metric} (mean over each report's steps)")
    _curves(right, {t.name: (list(range(len(t.held_out))), t.held_out) for t in trials if t.held_out})
    right.set_xlabel("gradient steps on the support set")
    right.set_ylabel("held-out query loss")
    fig.suptitle(title)
    return fig


def _curves(ax, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    """Plot curves on a log axis fitted to the trials that did not diverge; a diverged one runs into the top
    edge, dashed, with an x where it leaves the plot."""
    if not curves:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    firsts = [y[0] for _, y in curves.values() if y and math.isfinite(y[0]) and y[0] > 0]
    reference = float(np.median(firsts)) if firsts else 1.0
    arrays = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in curves.items()}
    diverged = {k for k, (_, y) in arrays.items()
                if not np.all(np.isfinite(y)) or np.max(y, initial=0) > DIVERGED_FACTOR * reference}
    kept = [y[y > 0] for k, (_, y) in arrays.items() if k not in diverged]
    kept = [y for y in kept if y.size]
    top = max(float(y.max()) for y in kept) * 1.5 if kept else DIVERGED_FACTOR * reference
    bottom = min(float(y.min()) for y in kept) / 1.5 if kept else reference / 10
    for label, (x, y) in arrays.items():
        if label not in diverged:
            ax.plot(x, y, marker="o", ms=3, label=label)
            continue
        out = ~np.isfinite(y) | (y > top)
        first_out = int(np.argmax(out))
        shown = np.where(out, top, y)
        line = ax.plot(x[: first_out + 1], shown[: first_out + 1], ls="--", label=f"{label} (diverged)")[0]
        ax.plot([x[first_out]], [top], marker="x", ms=10, mew=2, color=line.get_color(), clip_on=False)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def summarize(parent, trials: list[TrialOutcome], plan: Plan, out) -> TrialOutcome | None:
    """Print and save the results table, and give the parent run the best trial, the table and the plot."""
    s = plan.settings
    metric, mode = s["metric"], s["mode"]
    table = results_table(trials, metric, mode)
    print(table, file=out)
    write_atomic(plan.folder / "sweep_results.md", table + "\n")
    parent.log_artifact(plan.folder / "sweep_results.md")
    parent.log_figure(comparison_plot(trials, metric, f"sweep {plan.name}: {metric} ({mode})"), "sweep_comparison")
    counts = {status: sum(t.status == status for t in trials) for status in ("completed", "stopped early", "failed")}
    parent.log_metrics({"sweep/trials": len(trials), "sweep/completed": counts["completed"],
                        "sweep/stopped_early": counts["stopped early"], "sweep/failed": counts["failed"],
                        "sweep/diverged": sum(t.diverged for t in trials)}, 0)
    best = best_trial(trials, mode)
    if best is None:
        print(f"sweep {plan.name}: no trial reported a finite {metric}", file=out)
        return None
    parent.log_params({"best.run": best.name, "best.run_id": best.run_id or "",
                       **{f"best.{k}": v for k, v in best.swept.items()}})
    write_atomic(plan.folder / "best_config.yaml", parse_config(best.config).to_yaml())
    parent.log_artifact(plan.folder / "best_config.yaml")
    log_best(parent, best, metric)
    print(f"sweep {plan.name}: best trial {best.name} ({metric} {best.metric:.4g}, {best.status}); config in "
          f"{plan.folder / 'best_config.yaml'}", file=out)
    return best


def log_best(parent, best: TrialOutcome, metric: str) -> None:
    """The numbers the sweep compared the best trial by, under the child's names: ``metric`` at each report (its
    window mean: the last is the results table's), the evaluation results at step 0 (bars, as in the child) and
    the adaptation curves at their adaptation steps; not the child's per-step training metrics."""
    for step, value in best.curve:
        if math.isfinite(value):
            parent.log_metrics({metric: value}, step)
    results = {k: v for k, v in best.metrics.items()
               if k.startswith("eval/") and not k.endswith("_curve") and math.isfinite(v)}
    if results:
        parent.log_metrics(results, 0)
    for key, values in best.curves.items():
        for k, value in enumerate(values):
            if math.isfinite(value):
                parent.log_metrics({key: value}, k)


def register_best(best: TrialOutcome, plan: Plan, name: str, out) -> None:
    """Register the best trial's logged model in the MLflow model registry as a new version of ``name``."""
    from orchestrator.tracking.delivery import register
    from orchestrator.tracking.store import TrackingError

    if best.run_id is None:
        print(f"--register {name}: the best trial has no MLflow run (tracking is off); nothing registered", file=out)
        return
    try:
        version = register(resolve_uri(plan.first), best.run_id, name)
    except TrackingError:
        print(f"--register {name}: the best trial logged no model (tracking.log_model is off)", file=out)
        return
    print(f"registered {best.name}'s model as {name} version {version}", file=out)
