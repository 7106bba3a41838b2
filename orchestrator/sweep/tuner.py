"""Sweeps on Ray Tune: every trial is one normal ``metaray train`` run, a child MLflow run of the sweep's parent.

    metaray sweep configs/sine-maml.yaml --search 'algorithm.inner_lr=loguniform(1e-3, 1)' --samples 8 \\
        --scheduler asha --max-concurrent 2
    metaray sweep configs/sine-maml.yaml --grid 'outer.lr=[0.001, 0.01]'       # one trial per value
    metaray sweep configs/sine-*.yaml                                           # one trial per config
    metaray sweep ... --name NAME --resume                                      # continue an interrupted sweep

The trials are expanded, named (swept values first) and validated before anything starts (``sweep_plan``),
then run as Ray Tune trials (``sweep_trial``), each in a placement group sized from its config, embedded or on a cluster
(``--address``). Schedulers stop trials at their reports (ASHA); trials checkpoint through Tune, so
``Tuner.restore`` resumes an interrupted sweep and trials that were stopped stay stopped. A trial that
crashes is reported and the others go on. Tune's storage is ``<run.dir>/<sweep name>/tune``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from orchestrator.atomic import write_atomic
from orchestrator.config import Config, ConfigError
from orchestrator.run.interrupts import Interrupted
from orchestrator.sweep import report as sweep_report
from orchestrator.sweep.plan import STATE, Plan, plan
from orchestrator.sweep.report import TrialOutcome
from orchestrator.sweep.trial import TRIAL, Progress, Trial, placement
from orchestrator.tracking.open_tracker import open_tracker
from orchestrator.workers.ray_session import connect, shutdown, start_embedded

ASHA_REDUCTION = 3  # keep the best third at every rung (Hyperband's eta)


@dataclass
class SweepResult:
    parent_run_id: str | None
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    folder: Path

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == "failed"]


def sweep(paths: list[str], overrides: list[str] = (), grid: list[str] = (), experiment: str | None = None,
          name: str | None = None, out=None, *, search: list[str] = (), samples: int = 1,
          max_concurrent: int | None = None, scheduler: str = "fifo", metric: str | None = None,
          mode: str = "min", resume: bool = False, register: str | None = None) -> SweepResult:
    """Run (or with ``resume`` continue) a sweep on Ray Tune; the parent MLflow run gets its summary.

    A trial that crashes is reported and the others go on (``SweepResult.failed``). Raises ``Interrupted``
    when stopped by SIGINT/SIGTERM: every trial is checkpointed and ``resume`` continues them.
    """
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {max_concurrent}: must be at least 1")
    p = plan(paths, overrides, search, grid, samples, scheduler, metric, mode, experiment, name)
    parent_id = _claim_folder(p, resume)
    started = _start_ray(p, max_concurrent)
    parent, status = None, "FAILED"
    try:
        _check_store_reachable(p)
        parent_cfg = p.first.model_copy(update={"run": p.first.run.model_copy(update={"name": p.name})})
        parent = open_tracker(parent_cfg, state={"run_id": parent_id}, command="sweep", run_dir=p.folder)
        write_atomic(p.folder / STATE, json.dumps({"parent_run_id": parent.run_id, **p.settings}, indent=1))
        parent.log_params({f"sweep.{k}": v for k, v in {**p.settings, "max_concurrent": max_concurrent}.items()})
        print(f"sweep {p.name}: {len(p.trials)} trials ({scheduler}, {p.settings['metric']} {mode}) in {p.folder}",
              file=out, flush=True)
        with _sigterm_as_sigint() as signals:
            analysis = _tune(p, parent.run_id, max_concurrent, resume)
        outcomes = sweep_report.outcomes(analysis, p, parent.run_id)
        sweep_report.settle_children(outcomes, p)
        if any(o.status == "unfinished" for o in outcomes):
            print(f"sweep {p.name} interrupted: every trial is checkpointed; continue it with the same command and "
                  f"--name {p.name} --resume", file=out, flush=True)
            raise Interrupted(signals.get("signum", signal.SIGINT))
        best = sweep_report.summarize(parent, outcomes, p, out)
        if register and best is not None:
            sweep_report.register_best(best, p, register, out)
        status = "FINISHED"
        return SweepResult(parent.run_id, outcomes, best, p.folder)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            parent.close(status)
        if started:
            shutdown()


def _claim_folder(p: Plan, resume: bool) -> str | None:
    """The sweep's folder: new, or (resume) holding the same sweep; the parent run id to continue."""
    state = p.folder / STATE
    if not resume:
        if state.exists():
            raise ConfigError(f"{p.folder} already holds a sweep; pass --resume to continue it, or another --name")
        return None
    if not state.exists():
        raise ConfigError(f"--resume: no sweep in {p.folder} (no {STATE}); start it without --resume")
    saved = json.loads(state.read_text())
    changed = [k for k, v in p.settings.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume: the sweep in {p.folder} was started with other settings ({', '.join(changed)} "
                          "differ); rerun its original command with --resume")
    return saved["parent_run_id"]


def _start_ray(p: Plan, max_concurrent: int | None) -> bool:
    """Join the cluster (``--address``) or start Ray embedded with room for the concurrent trials."""
    if ray.is_initialized() or p.first.workers.address:
        return connect(p.first)
    per_trial = max(_trial_cpus(t.config) for t in p.trials)
    cores = os.cpu_count() or 1
    concurrent = max_concurrent or max(1, math.floor(cores / per_trial))
    start_embedded(max(cores, math.ceil(concurrent * per_trial)))
    return True


def _trial_cpus(cfg: Config) -> float:
    return sum(b.get("CPU", 0) for b in _bundles(cfg))


def _bundles(cfg: Config) -> list[dict[str, float]]:
    return placement(cfg).bundles


def _check_store_reachable(p: Plan) -> None:
    """A SQLite file is a store for one machine: trials on other nodes would each write a store of their own."""
    uri = p.first.tracking.uri or ""
    if not p.first.tracking.enabled or not uri.startswith(("sqlite:", "file:", "/")):
        return
    here = socket.gethostname()
    remote = sorted({n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"] and n["NodeManagerHostname"] != here})
    if remote:
        raise ConfigError(f"tracking.uri: {uri} is a file on this machine, but the cluster has nodes on "
                          f"{', '.join(remote)}; run an MLflow server that every node reaches and set "
                          "MLFLOW_TRACKING_URI=http://HOST:PORT (see README, Sweeps)")


@contextmanager
def _sigterm_as_sigint() -> Iterator[dict[str, int]]:
    """Tune stops a sweep gracefully on SIGINT; preemption sends SIGTERM: treat it the same (exit 143)."""
    seen: dict[str, int] = {}

    def forward(signum: int, frame) -> None:
        seen["signum"] = signum
        os.kill(os.getpid(), signal.SIGINT)

    try:
        old = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: no handlers
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, old)


def _tune(p: Plan, parent_run_id: str | None, max_concurrent: int | None, resume: bool):
    """Run the trials on Ray Tune (or restore the interrupted run); the experiment's analysis, as saved."""
    storage = p.folder / "tune"
    if resume and tune.Tuner.can_restore(str(storage)):
        tuner = tune.Tuner.restore(str(storage), trainable=Trial, resume_errored=True)
    else:
        s = p.settings
        scheduler = None
        if s["scheduler"] == "asha":
            steps = max(t.config.outer.steps for t in p.trials)
            grace = min(t.config.run.log_every for t in p.trials)
            scheduler = ASHAScheduler(time_attr="step", max_t=max(steps, 1), grace_period=max(1, min(grace, steps)),
                                      reduction_factor=ASHA_REDUCTION)
        specs = [{"name": t.name, "swept": t.swept, "config": t.config.model_dump(mode="json"),
                  "parent_run_id": parent_run_id, "metric": s["metric"], "mode": s["mode"]} for t in p.trials]
        tuner = tune.Tuner(
            Trial,
            param_space={TRIAL: tune.grid_search(specs)},
            # No reuse_actors: a reused actor is reset 2 s after its trial was told to stop, before a run can
            # close (checkpoint, MLflow), and Tune then fails the next trial.
            tune_config=tune.TuneConfig(metric=s["metric"], mode=s["mode"], scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=storage.name, storage_path=str(storage.parent), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      callbacks=[Progress(), CSVLoggerCallback(), JsonLoggerCallback()]),
        )
    with _quiet_tune():
        results = tuner.fit()
    return tune.ExperimentAnalysis(results.experiment_path)  # as saved: trials still running when interrupted


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's own tables and per-trial tracebacks off (``Progress`` prints one line per trial event, and a
    failed trial's traceback stays in its error.txt); its CSV and JSON logs on, its TensorBoard log off."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # read by Tuner.fit
             # Checkpoints every few steps (tiny runs) make Tune warn about its own state snapshots.
             "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    old = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    # Said by Progress, and by sweep() (how to resume), in metaray's words.
    drops = [(logging.getLogger("ray.tune.execution.tune_controller"), _DropMessages("Trial task failed")),
             (logging.getLogger("ray.tune.tune"), _DropMessages("Experiment has been interrupted")),
             (logging.getLogger("ray.tune.tune"), _DropMessages("Trials did not complete"))]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]
