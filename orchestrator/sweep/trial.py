"""One trial of a sweep: a normal ``metaray train`` run inside a Ray Tune trial and its placement group.

The trial's placement group is sized exactly from its config: bundle 0 for the trial's own actor, where
the central learner runs, and one bundle per worker (an actor started beyond the bundles would wait for
ever, so elastic growth is refused in sweeps). The workers take those bundles (``actor_pool``).

Every ``run.log_every`` meta-steps the trial reports the means of its metrics over those steps (and
``step``) to Tune; at ``run.checkpoint_every`` the report carries the metaray checkpoint, and the last
report, after the evaluation, carries the final one and the held-out scores. Tune stops a trial only at
a report (a scheduler's decision, or the whole sweep stopping): training ends there, checkpointed, with
no evaluation (and Tune kills a trial still busy 10 s after a sweep is stopped). ``Tuner.restore`` brings
back the trials that had not finished; each resumes the later of its Tune checkpoint and its run folder's
(the same trajectory, bit for bit) in the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.train._internal.session import get_session
from ray.tune.result import RESULT_DUPLICATE
from ray.tune.trainable.function_trainable import FunctionTrainable

from orchestrator.atomic import write_atomic
from orchestrator.config import Config, ConfigError, parse_config
from orchestrator.run import checkpoint
from orchestrator.run.recipe import train_here
from orchestrator.sweep.report import trial_error
from orchestrator.tracking.delivery import unfinished_run

TRIAL = "trial"  # the key of the trial's spec in Tune's config
TUNE_CHECKPOINT = "tune-checkpoint"  # folder in the run folder holding what a report hands to Tune
REPORT = "report.json"  # beside the checkpoint handed to Tune: the means that report carried
# How long stopping a trial waits for its run to close (checkpoint, MLflow); Tune's own limit is 600 s
# (TUNE_FORCE_TRIAL_CLEANUP_S), and 10 s once the whole sweep is ending.
CLOSE_GRACE_S = 600.0


def placement(cfg: Config) -> tune.PlacementGroupFactory:
    """Bundle 0: the trial's actor (the central learner); then one bundle per worker actor."""
    w = cfg.workers
    head = {"CPU": w.learner_num_cpus, **({"GPU": w.learner_num_gpus} if w.learner_num_gpus else {})}
    if w.mode != "ray":
        return tune.PlacementGroupFactory([head])
    worker = {"CPU": w.num_cpus, **({"GPU": w.num_gpus} if w.num_gpus else {})}
    return tune.PlacementGroupFactory([head] + [dict(worker) for _ in range(w.num_workers)])


def run_trial(config: dict[str, Any]) -> bool:
    """Train the trial's config with reports and checkpoints through Tune; True when Tune stopped it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per report
    spec = config[TRIAL]
    cfg = parse_config(spec["config"])
    resume, last = _restore(cfg, tune.get_checkpoint())
    reporter = Reporter(cfg, spec["metric"], spec["mode"], last)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    # A trial killed before its first checkpoint starts again from step 0, in the MLflow run it had begun (its
    # recorded steps are not recorded again): one run per trial, however often the sweep was interrupted.
    begun = None if resume else unfinished_run(cfg.run_dir)
    with open(cfg.run_dir / "train.log", "a") as out:
        result = train_here(cfg, resume, True, out, spec["parent_run_id"], should_stop=None,
                            on_step=reporter.on_step, tracker_state=begun)
    if result.diverged and not reporter.stopped:
        reporter.diverged(result.step, result.diverged)
    elif not reporter.stopped:
        reporter.final(result.step, result.results)
    return reporter.stopped


class Reporter:
    """The ``on_step`` hook: window means to Tune every ``run.log_every`` steps, checkpoints through Tune.

    The last report comes after the evaluation (``final``), with the held-out scores: a scheduler that stops
    the trial there (ASHA at its last rung) then stops a run that has nothing left to do.
    """

    def __init__(self, cfg: Config, metric: str, mode: str, last: dict[str, float] | None = None):
        self.cfg, self.metric, self.mode = cfg, metric, mode
        self._window: dict[str, list[float]] = {}
        self._last = last or {}  # the means of the last report (a restored trial: from its Tune checkpoint)
        self.stopped = False

    def on_step(self, step: int, metrics: dict[str, float], save: Callable[[], None]) -> bool:
        for k, v in metrics.items():
            self._window.setdefault(k, []).append(float(v))
        if step == self.cfg.outer.steps or step % self.cfg.run.log_every:
            return False
        checkpointed = step % self.cfg.run.checkpoint_every == 0
        if checkpointed:
            save()
        self.stopped = self._report(step, checkpointed)
        return self.stopped

    def final(self, step: int, results: dict) -> None:
        """The last report: the final checkpoint (saved by the run), the held-out scores, ``completed``."""
        scores = {f"eval/{ev}/{m}_step{s}": sc.mean for ev, by_metric in results.items()
                  for m, by_step in by_metric.items() for s, sc in by_step.items()}
        known = {*self._last, *self._window}
        if self.metric not in known:
            raise ConfigError(f"--metric {self.metric}: this trial reports {', '.join(sorted(known))}")
        self.stopped = self._report(step, True, {**scores, "completed": 1.0})

    def diverged(self, step: int, reason: str) -> None:
        """The last report of a trial that stopped on divergence: the worst value of the metric, and why."""
        inf = math.inf if self.mode == "min" else -math.inf
        self._window = {self.metric: [inf]}
        self.stopped = self._report(step, True, {"diverged": reason})

    def _report(self, step: int, checkpointed: bool, extra: dict[str, float] | None = None) -> bool:
        """Report the window's means (and the latest value of what the window lacks: validation metrics between
        validations); True when Tune stopped the trial at this report."""
        means = {**self._last, **{k: _mean(v) for k, v in self._window.items()}}
        if self.metric not in means:  # e.g. val/loss before the first validation: nothing to compare yet
            return False
        self._window, self._last = {}, means
        report = {**means, **(extra or {}), "step": step, "node_ip": ray.util.get_node_ip_address()}
        if not math.isfinite(report[self.metric]):
            # A diverged trial is the worst trial: NaN would never be stopped by ASHA (NaN < x is false).
            report[self.metric] = math.inf if self.mode == "min" else -math.inf
        ckpt = tune.Checkpoint.from_directory(str(_handoff(self.cfg, means))) if checkpointed else None
        try:
            tune.report(report, checkpoint=ckpt)
        except SystemExit:  # Tune ends a trial's thread here: a scheduler stopped it, or the sweep is stopping
            return True
        return False


def _mean(values: list[float]) -> float:
    # Any non-finite step makes the window non-finite: a diverging trial is not averaged into looking fine.
    return math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else math.nan


def _handoff(cfg: Config, report: dict[str, float]) -> Path:
    """A folder for Tune to persist: the current checkpoint (a hard link when possible) and the report's means."""
    folder = cfg.run_dir / TUNE_CHECKPOINT
    folder.mkdir(exist_ok=True)
    target, source = folder / checkpoint.FILENAME, cfg.run_dir / checkpoint.FILENAME
    target.unlink(missing_ok=True)
    try:
        target.hardlink_to(source)  # checkpoint.save replaces the file by rename: the link keeps this version
    except OSError:
        shutil.copyfile(source, target)
    write_atomic(folder / REPORT, json.dumps(report))
    return folder


def _restore(cfg: Config, reported: tune.Checkpoint | None) -> tuple[bool, dict[str, float]]:
    """Put the checkpoint to continue from in the run folder: (whether there is one, the last report's means).

    Tune hands back the checkpoint of the trial's last report; the run folder may hold a later one (written
    when the sweep was interrupted). Both lie on the same trajectory, so the later one is kept.
    """
    here, last = cfg.run_dir / checkpoint.FILENAME, {}
    if reported is not None:
        with reported.as_directory() as folder:
            theirs = Path(folder) / checkpoint.FILENAME
            if not here.exists() or checkpoint.load(theirs).step > checkpoint.load(here).step:
                write_atomic(here, theirs.read_bytes())
            if (Path(folder) / REPORT).exists():
                last = json.loads((Path(folder) / REPORT).read_text())
    return here.exists(), last


class Progress(tune.Callback):
    """One line per trial event in the terminal (Tune's own tables are off)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"  trial {_name(trial)}: started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metric = trial.config[TRIAL]["metric"]
        if "step" in result and metric in result:
            total = trial.config[TRIAL]["config"]["outer"]["steps"]
            print(f"  trial {_name(trial)}: step {result['step']}/{total} {metric} {result[metric]:.4g}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result
        print(f"  trial {_name(trial)}: " + ("done" if last.get("completed") else
                                             f"stopped early at step {last.get('step', 0)}"), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  trial {_name(trial)}: FAILED ({trial_error(trial)}); the other trials go on", flush=True)


def _name(trial) -> str:
    return trial.config[TRIAL]["name"]


class Trial(FunctionTrainable):
    """``run_trial`` as Tune's trainable: its placement group, and a stop that waits for the run to close.

    Tune stops a trial by flagging its thread and then terminating its actor right away; without waiting, a
    stopped trial would leave its MLflow run RUNNING and its worker actors to Ray's fate-sharing.
    """

    _name = "metaray-trial"

    @classmethod
    def default_resource_request(cls, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return placement(parse_config(config[TRIAL]["config"]))

    def _trainable_func(self, config: dict[str, Any]) -> None:
        if not run_trial(config):
            # As Tune's own function wrapper does: the last result again, marked, tells Tune the trial is done.
            # A trial Tune stopped reports nothing more: its session is already being closed.
            get_session().report({RESULT_DUPLICATE: True})

    def cleanup(self) -> None:
        thread = getattr(get_session(), "training_thread", None)
        try:
            super().cleanup()
        finally:
            if thread is not None and thread.is_alive():
                threading.Thread.join(thread, CLOSE_GRACE_S)  # not RunnerThread.join: Tune reports its errors
