"""One run from config to evaluated, tracked checkpoint: what ``metaray train`` and ``metaray eval`` do.

>>> from orchestrator.config import load_config
>>> result = train(load_config("configs/sine-maml.yaml", ["outer.steps=100"]))  # doctest: +SKIP

The recipe of ``train``: check the data and the checkpoint, open the tracker, start the workers, give
the learner, the fault counters and the tracker their saved states, loop over meta-steps with periodic
checkpoints, then evaluate, plot and export. A checkpoint is the union of those objects' state dicts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from learners.params import ParamSpec, Params
from orchestrator import checkpoint, plots
from orchestrator.atomic import write_atomic
from orchestrator.build import build_algorithm, build_tasks, check_tasks
from orchestrator.config import Config
from orchestrator.evaluate import Results, from_json, mean_ci
from orchestrator.group import make_group
from orchestrator.interrupts import Interrupted, StopSignals
from orchestrator.learner import CentralLearner
from orchestrator.report import EVAL_FILE, evaluate_and_report
from orchestrator.selection import BEST, ModelSelection, selection_for, validate
from orchestrator.tracking import open_tracker
from tasks.episode import EpisodeIds, Purpose

HISTORY_PREFIXES = ("meta/", "inner/", "orchestrator/")
# Written once a run's evaluation (EVAL_FILE) and artifacts are in: --resume of that same checkpoint has nothing
# left to do.
DONE = "done.json"
OnStep = Callable[[int, dict[str, float], Callable[[], None]], bool]


@dataclass
class TrainResult:
    params: Params
    step: int
    faults: int
    fault_events: list[str]
    skipped_steps: int
    results: Results
    run_dir: Path
    history: dict[str, list[float]]  # per meta-step of this process: meta/*, inner/*, orchestrator/*
    run_id: str | None
    test_curve: tuple[np.ndarray, np.ndarray] | None  # held-out query loss (mean, 95% CI) after 0..k steps
    learner_pid: int  # the process that ran the learner (this one, or a learner actor's)
    tested_step: int  # the step of the θ the test results are of (the best checkpoint's, with validation)


def train(cfg: Config, resume: bool = False, evaluate: bool = True, out=None,
          parent_run_id: str | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Meta-train per ``cfg`` (continuing the run's checkpoint when ``resume``), evaluate, save, track.

    With ``workers.learner: actor`` all of it runs inside a Ray actor with its own resources (the
    driver only waits), so a cluster's head node, where ``ray job submit`` runs the command, does no work.
    SIGINT/SIGTERM (or ``should_stop()`` turning true) stop at the next step boundary with a checkpoint.
    Progress and results are printed to ``out`` (None: ``sys.stdout`` as it is when printing).
    """
    if cfg.workers.learner == "actor":
        from orchestrator.learner_actor import train_in_actor

        return train_in_actor(cfg, resume, evaluate, parent_run_id)
    return train_here(cfg, resume, evaluate, out, parent_run_id, should_stop)


def train_here(cfg: Config, resume: bool, evaluate: bool, out, parent_run_id: str | None,
               should_stop: Callable[[], bool] | None, on_step: OnStep | None = None) -> TrainResult:
    """``train`` with the learner in this process. ``on_step(step, metrics, save)`` is called after every
    meta-step (with the validation metrics of that step, if any; ``save()`` checkpoints now); when it returns
    True (a sweep's scheduler stopped the trial) training ends there: checkpointed and closed, not evaluated."""
    ckpt = _starting_point(cfg, resume, out)
    algorithm = build_algorithm(cfg)
    # Opened before Ray starts: an unusable tracking store is reported before any work is done.
    tracker = open_tracker(cfg, state=ckpt.tracker if ckpt else None, parent_run_id=parent_run_id,
                           run_dir=cfg.run_dir)
    selection = selection_for(cfg, algorithm.objective.metric_names)
    signals = StopSignals(should_stop)
    status, group = "FAILED", None
    try:
        with signals.installed():
            group = make_group(cfg)
            learner = CentralLearner(cfg, algorithm.init_params(cfg.run.seed), group)
            if ckpt is not None:
                learner.load_state_dict(ckpt.learner)
                group.faults.load_state_dict(ckpt.faults)
                if selection is not None and ckpt.selection is not None:
                    selection.load_state_dict(ckpt.selection)
            write_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())
            tracker.log_params({**cfg.flat(), "resources.shares": cfg.workers.share_count, **group.resources()})
            tracker.log_artifact(cfg.run_dir / "config.yaml")

            def save(name: str = checkpoint.FILENAME) -> None:
                tracker.flush()  # first: every metric the checkpoint covers is durable before it exists
                checkpoint.save(cfg.run_dir / name, cfg, learner=learner.state_dict(),
                                faults=group.faults.state_dict(), tracker=tracker.state_dict(),
                                selection=selection.state_dict() if selection else None)

            first_step = learner.step
            loop = _Loop(cfg, learner, group, tracker, selection, save, out, on_step)
            try:
                with signals.graceful_section():
                    loop.run(signals)
            except Interrupted:
                save()
                print(f"interrupted: checkpoint at step {learner.step} in {cfg.run_dir / checkpoint.FILENAME}; "
                      "continue with --resume", file=out)
                raise
            save()
            params, tested_step = learner.params, learner.step
            if selection is not None and selection.best_step is not None:
                best = checkpoint.load(cfg.run_dir / BEST)
                params, tested_step = best.params, best.step
                print(f"testing the best checkpoint: step {best.step}, {selection.key} {selection.best_value:.4f}",
                      file=out)
            theta = ParamSpec.of(params).flatten(params).numpy().astype(np.float32)
            results, test_curve = {}, None
            done = _done(cfg, learner.step) if ckpt is not None and evaluate and not loop.stopped else None
            try:
                if done is not None:  # e.g. a sweep trial that completed just as its sweep was interrupted
                    results, test_curve = done
                    print(f"{cfg.run_dir}: already trained and evaluated at step {learner.step}; nothing left to do",
                          file=out)
                elif evaluate and not loop.stopped:
                    results, curves = evaluate_and_report(cfg, algorithm, group, theta, tracker, learner.step,
                                                          cfg.run_dir, out)
                    test_curve = mean_ci(curves["test"]["loss"])
                if done is None:
                    _log_artifacts(cfg, algorithm, params, tracker, loop.history, first_step, learner.step)
                    if results:  # the results themselves are in EVAL_FILE, written by the evaluation
                        write_atomic(cfg.run_dir / DONE, json.dumps({
                            "step": learner.step, "test_curve": [c.tolist() for c in test_curve]}))
            except Interrupted:
                print(f"interrupted after training: the checkpoint at step {learner.step} is complete; evaluate it "
                      f"with `metaray eval {cfg.run_dir}`", file=out)
                raise
        if group.faults.count:
            print(f"worker faults survived: {group.faults.count} (" + "; ".join(group.faults.events[-3:]) + ")",
                  file=out)
        status = "FINISHED"
        return TrainResult(learner.params, learner.step, group.faults.count, list(group.faults.events),
                           learner.skipped_steps, results, cfg.run_dir, loop.history, tracker.run_id, test_curve,
                           os.getpid(), tested_step)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if group is not None:
            group.close()
        undelivered = tracker.close(status)
        if undelivered:
            print(undelivered, file=out)


def _done(cfg: Config, step: int) -> tuple[Results, tuple[np.ndarray, np.ndarray]] | None:
    """The saved results when this run was already evaluated (and its artifacts logged) at ``step``."""
    path = cfg.run_dir / DONE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["step"] != step:
        return None
    results = from_json(json.loads((cfg.run_dir / EVAL_FILE).read_text()))
    return results, tuple(np.asarray(c) for c in saved["test_curve"])


def _starting_point(cfg: Config, resume: bool, out) -> checkpoint.Checkpoint | None:
    """The checkpoint to continue (checked against ``cfg``), or None for a new run; bad data fails here first."""
    check_tasks(cfg, ("train", "val", "eval") if cfg.eval.every else ("train", "eval"))  # bad data fails here
    path = cfg.run_dir / checkpoint.FILENAME
    if not resume:
        if path.exists():
            raise checkpoint.CheckpointError(
                f"{cfg.run_dir} already holds a checkpoint; pass --resume to continue it, or set another run.name")
        return None
    ckpt = checkpoint.load(path)
    checkpoint.check_resumable(ckpt, cfg, build_algorithm(cfg).init_params(0))
    print(f"resuming {cfg.run_dir} at step {ckpt.step}", file=out)
    return ckpt


class _Loop:
    """Meta-steps up to ``outer.steps``: metrics to the tracker and the history, progress, checkpoints,
    validation and early stopping."""

    def __init__(self, cfg: Config, learner: CentralLearner, group, tracker, selection: ModelSelection | None,
                 save: Callable[..., None], out, on_step: OnStep | None = None):
        self.cfg, self.learner, self.group, self.tracker = cfg, learner, group, tracker
        self.selection, self.save, self.out, self.on_step = selection, save, out, on_step
        self.history: dict[str, list[float]] = {}
        self.stopped = False  # by on_step

    def run(self, signals: StopSignals) -> None:
        cfg, learner = self.cfg, self.learner
        started = time.perf_counter()
        while learner.step < cfg.outer.steps and not (self.selection and self.selection.exhausted):
            signals.check()
            metrics = learner.meta_step()
            self.tracker.log_metrics(metrics, learner.step - 1)
            for k, v in metrics.items():
                if k.startswith(HISTORY_PREFIXES):
                    self.history.setdefault(k, []).append(v)
            if learner.step % cfg.run.log_every == 0 or learner.step == cfg.outer.steps:
                _progress(self.out, learner.step, cfg.outer.steps, metrics, time.perf_counter() - started)
            validated = {}
            if self.selection and (learner.step % cfg.eval.every == 0 or learner.step == cfg.outer.steps):
                validated = self._validate()
            if learner.step % cfg.run.checkpoint_every == 0:
                self.save()
            if self.on_step is not None and self.on_step(learner.step, {**metrics, **validated}, self.save):
                self.stopped = True
                break

    def _validate(self) -> dict[str, float]:
        step, selection = self.learner.step, self.selection
        start = time.perf_counter()
        metrics = validate(self.cfg, self.group, self.learner.theta())
        metrics["perf/val_s"] = time.perf_counter() - start
        improved = selection.update(step, metrics)
        if improved:
            self.save(BEST)
        self.tracker.log_metrics(metrics, step)
        note = "new best" if improved else f"best: step {selection.best_step}"
        print(f"validation at step {step}: {selection.key} {metrics[selection.key]:.4f} "
              f"± {metrics[selection.key + '_ci95']:.4f} ({note})", file=self.out, flush=True)
        if selection.exhausted:
            print(f"early stop at step {step}: no better {selection.key} in {selection.patience} validations",
                  file=self.out, flush=True)
        return metrics


def _log_artifacts(cfg: Config, algorithm, params: Params, tracker, history, first_step: int, step: int) -> None:
    if cfg.tracking.plots and history:
        tracker.log_figure(plots.learning_curves(history, first_step), "learning_curves")
    if cfg.tracking.log_checkpoint:
        tracker.log_artifact(cfg.run_dir / checkpoint.FILENAME, "checkpoint")
    if cfg.tracking.log_model:
        module, example = algorithm.export(params, _eval_batch(cfg, 1))
        tracker.log_model(module, example.numpy(), step=step)


def evaluate_checkpoint(path: str | Path, cfg: Config | None = None, out=None) -> Results:
    """Evaluate a saved checkpoint (``metaray eval``) under its own config, or ``cfg``; tracked as its own run."""
    ckpt = checkpoint.load(path)
    cfg = cfg or ckpt.config
    algorithm = build_algorithm(cfg)
    checkpoint.check_params(ckpt, algorithm.init_params(0))
    tracker = open_tracker(cfg, command="eval", run_dir=ckpt.path.parent, evaluates=ckpt.tracker.get("run_id"))
    status, group = "FAILED", None
    try:
        tracker.log_params({**cfg.flat(), "eval.checkpoint": str(ckpt.path), "eval.checkpoint_step": ckpt.step})
        group = make_group(cfg)
        theta = ParamSpec.of(ckpt.params).flatten(ckpt.params).numpy().astype(np.float32)
        results, _ = evaluate_and_report(cfg, algorithm, group, theta, tracker, ckpt.step, ckpt.path.parent, out,
                                         name=f"eval-{tracker.run_id or time.strftime('%Y%m%d-%H%M%S')}.json")
        status = "FINISHED"
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if group is not None:
            group.close()
        undelivered = tracker.close(status)
        if undelivered:
            print(undelivered, file=out)


def _eval_batch(cfg: Config, n: int):
    return build_tasks(cfg.task, "eval").sample(EpisodeIds(cfg.eval.seed, 0, tuple(range(n)), Purpose.EVAL))


def _progress(out, step: int, total: int, m: dict[str, float], elapsed: float) -> None:
    parts = [f"step {step}/{total}"]
    for key in ("meta/loss", "inner/loss_before", "inner/acc_after"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['perf/tasks_per_s']:.0f} tasks/s")
    parts.append(f"faults {int(m['orchestrator/faults'])}")
    parts.append(f"{elapsed:.0f}s")
    print(" | ".join(parts), file=out, flush=True)
