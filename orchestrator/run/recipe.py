"""The training recipe of one run, with the learner in this process: setup -> train -> evaluate -> close.

>>> from orchestrator.config import load_config
>>> result = train_here(load_config("configs/sine-maml.yaml", ["outer.steps=100"]))  # doctest: +SKIP

``setup`` checks the data and the checkpoint, opens the tracker, starts the workers and gives the learner,
the fault counters, the model selection and the tracker their saved states. ``train`` loops over meta-steps
with periodic checkpoints, validation and early stopping; a checkpoint is the union of those objects' state
dicts. ``evaluate`` scores the final (or best) θ on the held-out tasks, plots it and logs it as a model. ``Services``
closes the workers and the tracker once, with the run's end status. ``launch`` decides where this runs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from learners.params import Params, ParamSpec
from orchestrator.atomic import write_atomic
from orchestrator.build import blueprint, build_algorithm, build_tasks, check_tasks
from orchestrator.config import Config
from orchestrator.errors import DiskFull
from orchestrator.run import checkpoint
from orchestrator.run.central_learner import CentralLearner
from orchestrator.run.divergence import Divergence
from orchestrator.run.evaluation import EVAL_FILE, Results, evaluate_and_report, finite_or_none, from_json, mean_ci
from orchestrator.run.interrupts import Interrupted, StopSignals
from orchestrator.run.selection import BEST, selection_for, validate
from orchestrator.run.services import Services
from orchestrator.tracking import plots
from orchestrator.tracking.logged_model import example_task
from orchestrator.tracking.open_tracker import open_tracker
from tasks.episode import EpisodeIds, Purpose

HISTORY_PREFIXES = ("meta/", "inner/", "orchestrator/", "perf/")
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
    history: dict[str, list[float]]  # per meta-step of this process: meta/*, inner/*, orchestrator/*, perf/*
    run_id: str | None
    test_curve: tuple[np.ndarray, np.ndarray] | None  # held-out query loss (mean, 95% CI) after 0..k steps
    learner_pid: int  # the process that ran the learner (this one, or a learner actor's)
    tested_step: int  # the step of the θ the test results are of (the best checkpoint's, with validation)
    diverged: str | None = None  # why training stopped on divergence (``divergence``); then nothing was evaluated


def train_here(cfg: Config, resume: bool = False, evaluate: bool = True, out=None, parent_run_id: str | None = None,
               should_stop: Callable[[], bool] | None = None, on_step: OnStep | None = None,
               tracker_state: dict[str, Any] | None = None) -> TrainResult:
    """Meta-train per ``cfg`` in this process (continuing its checkpoint when ``resume``), evaluate, save, track.

    SIGINT/SIGTERM (or ``should_stop()`` turning true) stop at the next step boundary with a checkpoint.
    ``on_step(step, metrics, save)`` is called after every meta-step (with that step's validation metrics, if
    any; ``save()`` checkpoints now); when it returns True (a sweep's scheduler stopped the trial) training ends
    there: checkpointed and closed, not evaluated. Progress and results go to ``out`` (None: ``sys.stdout``).
    ``tracker_state`` continues that MLflow run when there is no checkpoint to resume (a restarted sweep trial).
    """
    recipe = TrainRecipe(cfg, resume, out)
    signals = StopSignals(should_stop)
    # Opened before Ray starts: an unusable tracking store is reported before any work is done.
    tracker = open_tracker(cfg, state=recipe.saved.tracker if recipe.saved else tracker_state,
                           parent_run_id=parent_run_id, run_dir=cfg.run_dir)
    try:
        with Services(tracker, out) as services, signals.installed():
            recipe.setup(services, signals)
            recipe.train(signals, on_step)
            if recipe.diverged:
                services.fail(recipe.diverged)
            if evaluate and not (recipe.stopped or recipe.diverged):
                recipe.evaluate()
            else:
                recipe.save_artifacts()
            return recipe.result()
    except DiskFull as e:
        raise DiskFull(f"{e}; {_last_good_checkpoint(cfg)}") from None


class TrainRecipe:
    """The state of one training run lives in the objects that own it (learner, fault log, selection, tracker);
    this class only sequences them."""

    def __init__(self, cfg: Config, resume: bool, out=None):
        self.cfg, self.out = cfg, out
        self.saved = _starting_point(cfg, resume, out)  # bad data or a bad checkpoint fail here, first
        self.algorithm = build_algorithm(cfg)
        self.selection = selection_for(cfg, self.algorithm.objective.metric_names)
        self.history: dict[str, list[float]] = {}
        self.stopped = False  # by on_step
        self.divergence = Divergence()
        self.diverged: str | None = None
        self.results: Results = {}
        self.test_curve: tuple[np.ndarray, np.ndarray] | None = None
        self.tested_step = 0

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, services: Services, signals: StopSignals) -> None:
        cfg = self.cfg
        self.tracker = services.tracker
        self.group = services.start_workers(cfg)
        signals.reclaim()  # ray.init installs Ray's own SIGTERM handler (which aborts the process)
        self.learner = CentralLearner(cfg, self.algorithm.init_params(cfg.run.seed), self.group)
        if self.saved is not None:
            self.learner.load_state_dict(self.saved.learner)
            self.group.faults.load_state_dict(self.saved.faults)
            if self.selection is not None and self.saved.selection is not None:
                self.selection.load_state_dict(self.saved.selection)
        self.first_step = self.learner.step
        write_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())
        self.tracker.log_config(cfg, self.group.resources())
        self.tracker.log_artifact(cfg.run_dir / "config.yaml")

    def save(self, name: str = checkpoint.FILENAME) -> None:
        self.tracker.flush()  # first: every metric the checkpoint covers is durable before it exists
        checkpoint.save(self.cfg.run_dir / name, self.cfg, learner=self.learner.state_dict(),
                        faults=self.group.faults.state_dict(), tracker=self.tracker.state_dict(),
                        selection=self.selection.state_dict() if self.selection else None)

    # -- train --------------------------------------------------------------------------------------------

    def train(self, signals: StopSignals, on_step: OnStep | None = None) -> None:
        """Meta-steps up to ``outer.steps`` (or early stopping); a stop request ends it at a step boundary."""
        try:
            with signals.graceful_section():
                self._loop(signals, on_step)
        except Interrupted:
            self.save()
            print(f"interrupted: checkpoint at step {self.learner.step} in {self.cfg.run_dir / checkpoint.FILENAME}; "
                  "continue with --resume", file=self.out)
            raise
        self.save()
        self._say_what_was_skipped()
        line = perf_summary(self.history, self.cfg.outer.meta_batch_size)
        if line:
            print(line, file=self.out, flush=True)

    def _say_what_was_skipped(self) -> None:
        """Skipped steps (non-finite gradients or updates) leave θ where it was: a run of only those trained
        nothing, which its output and its MLflow run say in words, not only in a counter."""
        learner = self.learner
        if not learner.skipped_steps:
            return
        if learner.skipped_steps >= learner.step:
            note = (f"nothing trained: all {learner.step} meta-steps were skipped (non-finite gradients or updates), "
                    "so θ is its initialization; lower outer.lr or algorithm.inner_lr")
            tags = {"metaray.trained": "nothing", "mlflow.note.content": note}
        else:
            note = f"{learner.skipped_steps} of {learner.step} meta-steps were skipped (non-finite gradients or updates)"
            tags = {}
        print(note, file=self.out, flush=True)
        self.tracker.log_tags({"metaray.skipped_steps": str(learner.skipped_steps), **tags})

    def _loop(self, signals: StopSignals, on_step: OnStep | None) -> None:
        cfg, learner, selection = self.cfg, self.learner, self.selection
        started = time.perf_counter()
        while learner.step < cfg.outer.steps and not (selection and selection.exhausted):
            signals.check()
            skipped = learner.skipped_steps
            metrics = learner.meta_step()
            self.diverged = self.divergence.check(learner.step - 1, metrics, learner.skipped_steps > skipped)
            if self.diverged:  # its blown-up values are not logged: they would flatten every run's charts
                print(self.diverged, file=self.out, flush=True)
                return
            self.tracker.log_metrics(metrics, learner.step - 1)
            for k, v in metrics.items():
                if k.startswith(HISTORY_PREFIXES):
                    self.history.setdefault(k, []).append(v)
            last = learner.step == cfg.outer.steps
            if learner.step % cfg.run.log_every == 0 or last:
                _progress(self.out, learner.step, cfg.outer.steps, metrics, time.perf_counter() - started)
            validated = self._validate() if selection and (learner.step % cfg.eval.every == 0 or last) else {}
            if learner.step % cfg.run.checkpoint_every == 0:
                self.save()
            if on_step is not None and on_step(learner.step, {**metrics, **validated}, self.save):
                self.stopped = True
                return

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

    # -- evaluate -----------------------------------------------------------------------------------------

    def tested(self) -> tuple[Params, int]:
        """The θ the test results are reported on: the best validated checkpoint's, else the last one."""
        if self.selection is not None and self.selection.best_step is not None:
            best = checkpoint.load(self.cfg.run_dir / BEST)
            print(f"testing the best checkpoint: step {best.step}, {self.selection.key} "
                  f"{self.selection.best_value:.4f}", file=self.out)
            return best.params, best.step
        return self.learner.params, self.learner.step

    def evaluate(self) -> None:
        """Score the tested θ on the held-out tasks, then log the artifacts; once per checkpoint (``DONE``)."""
        cfg, step = self.cfg, self.learner.step
        params, self.tested_step = self.tested()
        try:
            done = _done(cfg, step) if self.saved is not None else None
            if done is not None:  # e.g. a sweep trial that completed just as its sweep was interrupted
                self.results, self.test_curve = done
                print(f"{cfg.run_dir}: already trained and evaluated at step {step}; nothing left to do",
                      file=self.out)
                return
            theta = ParamSpec.of(params).flatten(params).numpy().astype(np.float32)
            self.results, curves = evaluate_and_report(cfg, self.algorithm, self.group, theta, self.tracker, step,
                                                       cfg.run_dir, self.out)
            self.test_curve = mean_ci(curves["test"]["loss"])
            self._log_artifacts(params)
            curve = [[finite_or_none(v) for v in c] for c in self.test_curve]
            write_atomic(cfg.run_dir / DONE, json.dumps({"step": step, "test_curve": curve}, allow_nan=False))
        except Interrupted:
            print(f"interrupted after training: the checkpoint at step {step} is complete; evaluate it "
                  f"with `metaray eval {cfg.run_dir}`", file=self.out)
            raise

    def save_artifacts(self) -> None:
        """Without an evaluation (stopped by a sweep's scheduler, diverged, or not asked for): the artifacts only
        (a diverged run's model is not worth deploying: none)."""
        params, self.tested_step = self.tested()
        self._log_artifacts(params)

    def _log_artifacts(self, params: Params) -> None:
        cfg, tracker = self.cfg, self.tracker
        if cfg.tracking.plots and self.history:
            tracker.log_figure(plots.learning_curves(self.history, self.first_step), "learning_curves")
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(cfg.run_dir / checkpoint.FILENAME, "checkpoint")
        if cfg.tracking.enabled and cfg.tracking.log_model and not self.diverged:
            spec = blueprint(cfg)
            prepare = getattr(self.algorithm, "prepare", None)  # statistics of θ that need the training data
            logged = prepare(params) if prepare is not None else params
            tracker.log_model(spec, logged, example_task(_eval_batch(cfg, 1), spec), step=self.learner.step)

    # -- close --------------------------------------------------------------------------------------------

    def result(self) -> TrainResult:
        faults = self.group.faults
        if faults.count:
            print(f"worker faults survived: {faults.count} (" + "; ".join(faults.events[-3:]) + ")", file=self.out)
        learner = self.learner
        return TrainResult(learner.params, learner.step, faults.count, list(faults.events), learner.skipped_steps,
                           self.results, self.cfg.run_dir, self.history, self.tracker.run_id, self.test_curve,
                           os.getpid(), self.tested_step, self.diverged)


def evaluate_checkpoint(path: str | Path, cfg: Config | None = None, out=None) -> Results:
    """Evaluate a saved checkpoint (``metaray eval``) under its own config, or ``cfg``; tracked as its own run."""
    ckpt = checkpoint.load(path)
    cfg = cfg or ckpt.config
    algorithm = build_algorithm(cfg)
    checkpoint.check_params(ckpt, algorithm.init_params(0))
    tracker = open_tracker(cfg, command="eval", run_dir=ckpt.path.parent, evaluates=ckpt.tracker.get("run_id"))
    with Services(tracker, out) as services:
        tracker.log_config(cfg, {}, {"eval.checkpoint": str(ckpt.path), "eval.checkpoint_step": ckpt.step})
        group = services.start_workers(cfg)
        theta = ParamSpec.of(ckpt.params).flatten(ckpt.params).numpy().astype(np.float32)
        results, _ = evaluate_and_report(cfg, algorithm, group, theta, tracker, ckpt.step, ckpt.path.parent, out,
                                         name=f"eval-{tracker.run_id or time.strftime('%Y%m%d-%H%M%S')}.json")
        return results


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


def _last_good_checkpoint(cfg: Config) -> str:
    """What a run that stopped on a full disk has kept (atomic writes: the last checkpoint is whole)."""
    path = cfg.run_dir / checkpoint.FILENAME
    try:
        step = checkpoint.load(path).step
    except checkpoint.CheckpointError:
        return f"no checkpoint was saved in {cfg.run_dir}: free space and start the run again"
    return f"the last good checkpoint is {path} (step {step}): free space and continue with --resume"


def _done(cfg: Config, step: int) -> tuple[Results, tuple[np.ndarray, np.ndarray]] | None:
    """The saved results when this run was already evaluated (and its artifacts logged) at ``step``."""
    path = cfg.run_dir / DONE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["step"] != step:
        return None
    results = from_json(json.loads((cfg.run_dir / EVAL_FILE).read_text()))
    return results, tuple(np.asarray(c, dtype=np.float64) for c in saved["test_curve"])  # null: NaN


def _eval_batch(cfg: Config, n: int):
    return build_tasks(cfg.task, "eval").sample(EpisodeIds(cfg.eval.seed, 0, tuple(range(n)), Purpose.EVAL))


def perf_summary(history: dict[str, list[float]], meta_batch: int) -> str:
    """One line of where this process's meta-steps went: medians over the steps after the first tenth (warm-up:
    the first calls, allocator growth), of the metrics the tracker logs (``perf/*``). ``benchmarks/gpu_check.py``
    reads it from the command's output, with tracking off."""
    step, compute = history.get("perf/step_s", []), history.get("perf/compute_s", [])
    if not step:
        return ""
    skip = len(step) // 10
    median = lambda values: float(np.median(values[skip:]))  # noqa: E731
    step_s, compute_s = median(step), median(compute)
    line = (f"perf: median of steps {skip + 1}-{len(step)} of this run: step {step_s * 1e3:.2f} ms, compute "
            f"{compute_s * 1e3:.2f} ms, overhead (step - compute) "
            f"{median([a - b for a, b in zip(step, compute)]) * 1e3:.2f} ms, {meta_batch / step_s:.1f} tasks/s")
    peak = history.get("perf/peak_gpu_mb")
    if peak:
        line += f", peak GPU memory of a worker {max(peak):.0f} MB"
    return line


def _progress(out, step: int, total: int, m: dict[str, float], elapsed: float) -> None:
    parts = [f"step {step}/{total}"]
    for key in ("meta/loss", "inner/loss_before", "inner/acc_after"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['perf/tasks_per_s']:.0f} tasks/s")
    parts.append(f"faults {int(m['orchestrator/faults'])}")
    if m["orchestrator/skipped_steps"]:
        parts.append(f"skipped {int(m['orchestrator/skipped_steps'])}")
    parts.append(f"{elapsed:.0f}s")
    print(" | ".join(parts), file=out, flush=True)
