"""One run from config to evaluated, tracked checkpoint: what ``metaray train`` and ``metaray eval`` do.

>>> from orchestrator.config import load_config
>>> result = train(load_config("configs/sine-maml.yaml", ["outer.steps=100"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
import numpy as np
import torch

from learners.algorithm import Algorithm
from learners.params import ParamSpec, Params
from orchestrator import checkpoint, plots
from orchestrator.build import build_algorithm, build_tasks
from orchestrator.config import Config, SineTaskConfig, parse_config
from orchestrator.evaluate import Score, evaluate_all, mean_ci, table, to_json
from orchestrator.group import LocalGroup, RunFailed, WorkerGroup, connect, make_group
from orchestrator.learner import CentralLearner
from orchestrator.tracking import MlflowTracker, NullTracker, open_tracker
from tasks.episode import EpisodeIds, Purpose

Results = dict[str, dict[str, dict[int, Score]]]
HISTORY_PREFIXES = ("meta/", "inner/", "orchestrator/")


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


def train(cfg: Config, resume: bool = False, evaluate: bool = True, out=sys.stdout,
          parent_run_id: str | None = None, stop: Callable[[], bool] | None = None) -> TrainResult:
    """Meta-train per ``cfg`` (continuing the run's checkpoint when ``resume``), evaluate, save, track.

    With ``workers.learner: actor`` all of it runs inside a Ray actor with its own resources (the
    driver only waits), so a cluster's head node, where ``ray job submit`` runs the command, does no work.
    """
    if cfg.workers.learner == "actor":
        return _train_in_actor(cfg, resume, evaluate, parent_run_id)
    run_dir = cfg.run_dir
    ckpt_path = run_dir / checkpoint.FILENAME
    for split in ("train", "eval"):
        build_tasks(cfg.task, split)  # bad data (missing store, too few images) fails here, before anything starts
    algorithm = build_algorithm(cfg)
    params = algorithm.init_params(cfg.run.seed)
    optimizer_state, step, state = None, 0, {}
    if resume:
        ckpt = checkpoint.load(ckpt_path)
        checkpoint.check_resumable(ckpt, cfg, params)
        params, optimizer_state, step, state = ckpt.params, ckpt.optimizer, ckpt.step, ckpt.state
        print(f"resuming {run_dir} at step {step}", file=out)
    elif ckpt_path.exists():
        raise checkpoint.CheckpointError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, or set another run.name")

    # Opened before Ray starts: an unusable tracking store is reported before any work is done.
    tracker = open_tracker(cfg, run_id=state.get("mlflow_run_id"), parent_run_id=parent_run_id, run_dir=run_dir)
    status = "FAILED"
    group = None
    try:
        group = make_group(cfg)
        learner = CentralLearner(cfg, params, group, optimizer_state, step, state.get("skipped_steps", 0))
        group.faults.count = state.get("faults", 0)
        group.faults.stragglers = state.get("stragglers", 0)
        checkpoint.write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        tracker.log_params({**cfg.flat(), **_resources(cfg, group)})
        tracker.log_artifact(run_dir / "config.yaml")
        history: dict[str, list[float]] = {}
        first_step = learner.step

        def save() -> None:
            checkpoint.save(ckpt_path, step=learner.step, params=learner.params,
                            optimizer=learner.optimizer.state_dict(), config=cfg,
                            state={"faults": group.faults.count, "stragglers": group.faults.stragglers,
                                   "skipped_steps": learner.skipped_steps,
                                   "mlflow_run_id": tracker.run_id})
            tracker.flush()  # what the checkpoint covers is recorded even if this process dies next

        started = time.perf_counter()
        try:
            while learner.step < cfg.outer.steps:
                if stop is not None and stop():
                    raise KeyboardInterrupt  # asked to stop from outside (the learner actor was cancelled)
                metrics = learner.meta_step()
                tracker.log_metrics(metrics, learner.step - 1)
                for k, v in metrics.items():
                    if k.startswith(HISTORY_PREFIXES):
                        history.setdefault(k, []).append(v)
                if learner.step % cfg.run.log_every == 0 or learner.step == cfg.outer.steps:
                    _progress(out, learner.step, cfg.outer.steps, metrics, time.perf_counter() - started)
                if learner.step % cfg.run.checkpoint_every == 0:
                    save()
        except KeyboardInterrupt:
            save()
            status = "KILLED"
            print(f"interrupted: checkpoint at step {learner.step} in {ckpt_path}; continue with --resume",
                  file=out)
            raise
        save()

        results: Results = {}
        test_curve = None
        theta = learner.theta()
        if evaluate:
            results, curves = _evaluate_and_report(cfg, algorithm, group, theta, tracker, learner.step, run_dir, out)
            test_curve = mean_ci(curves["test"]["loss"])
        if cfg.tracking.plots and history:
            tracker.log_figure(plots.learning_curves(history, first_step), "learning_curves")
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(ckpt_path, "checkpoint")
        if cfg.tracking.log_model:
            module, example = algorithm.export(learner.params, _eval_batch(cfg, 1))
            tracker.log_model(module, example.numpy())
        if group.faults.count:
            print(f"worker faults survived: {group.faults.count} (" + "; ".join(group.faults.events[-3:]) + ")",
                  file=out)
        status = "FINISHED"
        return TrainResult(learner.params, learner.step, group.faults.count, list(group.faults.events),
                           learner.skipped_steps, results, run_dir, history, tracker.run_id, test_curve,
                           os.getpid())
    finally:
        if group is not None:
            group.close()
        unsent = tracker.close(status)
        if unsent:
            print(f"tracking: {unsent} metrics are waiting in {run_dir} for the store; --resume sends them",
                  file=out)


class _LearnerActor:
    def train(self, config: dict, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        cfg = parse_config(config)
        cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"learner": "driver"})})
        import ray

        # ray.cancel on a running method of a regular actor only raises a flag: poll it once per meta-step.
        return train(cfg, resume, evaluate, parent_run_id=parent_run_id,
                     stop=lambda: ray.get_runtime_context().is_canceled())


def _train_in_actor(cfg: Config, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    started = connect(cfg)
    w = cfg.workers
    actor = ray.remote(_LearnerActor).options(num_cpus=w.learner_num_cpus, num_gpus=w.learner_num_gpus).remote()
    ref = actor.train.remote(cfg.model_dump(mode="json"), resume, evaluate, parent_run_id)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref)  # the learner checkpoints at the end of its current step, closes its MLflow run, stops
        try:
            ray.get(ref, timeout=cfg.tracking.close_timeout_s + 60)
        except Exception:  # noqa: BLE001 - it ends with the interruption we asked for
            pass
        raise
    except RayTaskError as e:
        raise e.as_instanceof_cause() from None  # e.g. a CheckpointError: the CLI reports it as a user error
    except RayActorError as e:
        raise RunFailed(f"the learner actor died ({type(e).__name__}); its last checkpoint is in {cfg.run_dir}: "
                        "continue with --resume") from None
    finally:
        ray.kill(actor)
        if started:
            ray.shutdown()


def evaluate_checkpoint(path: str | Path, cfg: Config | None = None, out=sys.stdout) -> Results:
    """Evaluate a saved checkpoint (``metaray eval``) under its own config, or ``cfg``; tracked as its own run."""
    ckpt = checkpoint.load(path)
    cfg = cfg or ckpt.config
    algorithm = build_algorithm(cfg)
    checkpoint.check_params(ckpt, algorithm.init_params(0))
    tracker = open_tracker(cfg, command="eval", run_dir=ckpt.path.parent)
    status, group = "FAILED", None
    try:
        tracker.log_params({**cfg.flat(), "eval.checkpoint": str(ckpt.path), "eval.checkpoint_step": ckpt.step})
        group = make_group(cfg)
        theta = ParamSpec.of(ckpt.params).flatten(ckpt.params).numpy().astype(np.float32)
        results, _ = _evaluate_and_report(cfg, algorithm, group, theta, tracker, ckpt.step, ckpt.path.parent, out,
                                          name=f"eval-{tracker.run_id or time.strftime('%Y%m%d-%H%M%S')}.json")
        status = "FINISHED"
        return results
    finally:
        if group is not None:
            group.close()
        tracker.close(status)


def _evaluate_and_report(cfg: Config, algorithm: Algorithm, group: LocalGroup | WorkerGroup, theta: np.ndarray,
                         tracker: MlflowTracker | NullTracker, step: int, out_dir: Path, out, name: str = "eval.json"):
    results, curves = evaluate_all(cfg, group, theta)
    print(table(algorithm.name, results), file=out)
    # `metaray eval` writes a file of its own: the training run's eval.json is never overwritten.
    checkpoint.write_atomic(out_dir / name, json.dumps(to_json(results), indent=2))
    summary = {}
    for ev, metrics in results.items():
        for m, by_step in metrics.items():
            for s, sc in by_step.items():
                summary[f"eval/{ev}/{m}_step{s}"] = sc.mean
                summary[f"eval/{ev}/{m}_step{s}_ci95"] = sc.ci95
    tracker.log_metrics(summary, step)
    # The whole curve, with the MLflow step = number of adaptation steps: MLflow's charts and compare
    # view then plot loss vs adaptation steps across runs.
    for ev, per_metric in curves.items():
        for m, per_task in per_metric.items():
            for k, value in enumerate(per_task.mean(0)):
                tracker.log_metrics({f"eval/{ev}/{m}_curve": float(value)}, k)
    if cfg.tracking.plots:
        _log_plots(cfg, algorithm, theta, tracker, curves)
    return results, curves


def _log_plots(cfg: Config, algorithm: Algorithm, theta: np.ndarray, tracker, curves) -> None:
    lines = {f"this run ({algorithm.name})": mean_ci(curves["test"]["loss"])}
    for name, values in tracker.sibling_curves("eval/test/loss_curve").items():
        lines.setdefault(name, (np.asarray(values), None))
    tracker.log_figure(plots.adaptation_plot(lines, f"{cfg.task.family}: held-out query loss"), "loss_vs_steps")
    if isinstance(cfg.task, SineTaskConfig):
        params = ParamSpec.of(algorithm.init_params(0)).unflatten(torch.from_numpy(theta.copy()))
        lr = cfg.eval.inner_lr or cfg.algorithm.inner_lr
        steps = tuple(sorted(set(cfg.eval.steps)))
        for name, task in [("test", cfg.task)] + [(p, cfg.probe_task(p)) for p in cfg.eval.probes]:
            fig = plots.sine_fits(algorithm, params, build_tasks(task), cfg.eval.seed, steps, lr)
            tracker.log_figure(fig, f"sine_fits_{name}")


def _resources(cfg: Config, group: LocalGroup | WorkerGroup) -> dict[str, object]:
    """What the run actually got: live workers, shares per step, and the Ray cluster's CPUs/GPUs."""
    out: dict[str, object] = {"resources.workers": group.size, "resources.shares": cfg.workers.share_count}
    if isinstance(group, WorkerGroup):
        import ray

        total = ray.cluster_resources()
        out.update({"resources.cluster_cpus": total.get("CPU", 0), "resources.cluster_gpus": total.get("GPU", 0),
                    "resources.nodes": sum(n["Alive"] for n in ray.nodes())})
    return out


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




