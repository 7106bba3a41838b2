"""MLflow tracking for one ``metaray train`` / ``metaray eval``: one run, logged only by the learner.

Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow 3
refuses the plain file store unless opted in); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` override it. The store is checked before training starts: a
bad URI is a user error (exit 2). After that, tracking never kills training and
never waits for the store: metrics are appended to the run's metric log on disk
and artifacts to its queue (both in ``<run dir>/tracking/<run id>/``), and a writer
process delivers them (``writer``), holding them while the store is down.

Exactly once: a checkpoint syncs the metric log first, so every metric up to the
checkpoint's step is durable. A resumed run continues the same MLflow run (its id is
in the checkpoint): it first waits until no writer of the crashed process is left
(the folder's lock), then reads the last step of each metric in the store and in the
log, and does not record those steps again; resume is bit-identical, so what it
recomputes equals what was kept. What is still undelivered when a run ends is said in
one line, with the command that delivers it (``metaray deliver RUN_DIR``, ``deliver``).

For the MLflow UI: the experiment opens in model-training mode; system metrics are on;
evaluation results come as a table with their 95% CIs (``eval/results.csv``) besides the
metrics; the final model is a LoggedModel named after the run, with the final evaluation
metrics linked, registered as ``tracking.registered_model`` if set; a ``metaray eval`` run is a
child of the training run it evaluates, named ``<training run>-eval``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag

from orchestrator.config import Config
from orchestrator.errors import DiskFull, one_line
from orchestrator.tracking import logged_model, metric_log
from orchestrator.tracking.artifact_queue import ArtifactQueue
from orchestrator.tracking.delivery import (
    FOLDER,
    LOCK_WAIT_S,
    lock_folder,
    lock_holder,
    read_meta,
    remove_folder,
    without_http_retries,
    write_meta,
)
from orchestrator.tracking.store import TrackingError, absolute_uri, experiment_name, first_touch, resolve_uri
from orchestrator.tracking.writer import MetricProcess
from orchestrator.version import version

log = logging.getLogger("metaray")
EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the UI: model training, not GenAI (traces, tokens)
MODEL_TRAINING = "custom_model_development"
EVALUATION_STEP = 0  # the MLflow step of evaluation results (see log_evaluation)


class MlflowTracker:
    def __init__(self, cfg: Config, *, run_id: str | None = None, parent_run_id: str | None = None,
                 evaluates: str | None = None, command: str = "train", run_dir: Path | None = None):
        """``run_id`` continues that run (resume); ``parent_run_id`` nests a new run under a sweep's parent;
        ``evaluates`` (a training run id) makes a ``metaray eval`` run that training run's child."""
        without_http_retries()
        self.uri = resolve_uri(cfg)
        self.cfg = cfg
        self.run_dir = run_dir or cfg.run_dir
        resumed = run_id is not None
        try:
            with first_touch(self.uri):
                self.client = MlflowClient(self.uri)
                self.experiment_id = self._experiment(experiment_name(cfg))
            if run_id is None:
                name, tags = cfg.run.name, _tags(cfg, command, parent_run_id)
                if evaluates:
                    name, tags = self._evaluation_of(evaluates, tags)
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
            self.run_name = self.client.get_run(run_id).info.run_name
        except Exception as e:  # noqa: BLE001 - whatever the store says, it is unusable: report it in one line
            raise self._unusable(e) from None
        self.run_id = run_id
        self.folder = self.run_dir / FOLDER / run_id
        self._recorded = self._recorded_steps() if resumed else {}
        write_meta(self.folder, {"uri": absolute_uri(self.uri), "run_id": run_id,
                                  "experiment_id": self.experiment_id})
        t = cfg.tracking
        system_step = None
        if t.system_metrics:
            system_step = 1 + max((s for k, s in self._recorded.items() if k.startswith("system/")), default=-1)
        self.writer = MetricProcess(self.uri, run_id, self.experiment_id, self.folder, t.flush_every_s,
                                    t.max_buffered_metrics, system_step)
        self.artifacts = ArtifactQueue(self.folder / "outbox")
        self._evaluation: list[tuple[str, float, int, int]] = []  # linked to the model when it is logged
        self._evaluated_step = 0

    def _unusable(self, e: Exception) -> TrackingError:
        return TrackingError(f"tracking store {self.uri!r} is not usable ({one_line(e, 240)}); start the server or "
                             "fix tracking.uri / MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db)")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_TRAINING})
            except mlflow.exceptions.MlflowException:
                found = self.client.get_experiment_by_name(name)  # created concurrently by a sibling
        if EXPERIMENT_KIND not in found.tags:  # made by an older metaray, or by hand: say what it holds
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id

    def _evaluation_of(self, train_run_id: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Name and tags of an evaluation run: ``<training run>-eval``, the training run's child."""
        try:
            trained = self.client.get_run(train_run_id)
        except mlflow.exceptions.MlflowException:  # trained against another store: nothing here to link to
            return f"{self.cfg.run.name}-eval", tags
        tags = {**tags, "metaray.evaluates": train_run_id}
        if trained.info.experiment_id == self.experiment_id:  # the UI nests runs within one experiment only
            tags["mlflow.parentRunId"] = train_run_id
        return f"{trained.info.run_name}-eval", tags

    def _recorded_steps(self) -> dict[str, int]:
        """Last step per metric key in the store or in the metric log, read once no old writer is left."""
        lock = lock_folder(self.folder, LOCK_WAIT_S)
        if lock is None:
            raise TrackingError(f"MLflow run {self.run_id} is still being written by process "
                                f"{lock_holder(self.folder)} (see {self.folder}); stop that run, then resume")
        try:
            try:
                run = self.client.get_run(self.run_id)
            except Exception as e:  # noqa: BLE001
                raise self._unusable(e) from None
            # The latest metric of each key is the one at its largest step (MLflow orders by step first).
            stored = {m.key: m.step for m in run.data._metric_objs}
            kept = metric_log.last_steps(self.folder)
            return {k: max(stored.get(k, -1), kept.get(k, -1)) for k in stored.keys() | kept.keys()}
        finally:
            os.close(lock)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this MLflow run."""
        return {"run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self._safe(lambda: self.client.get_run(self.run_id).data.params, {}) or {}
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._safe(lambda chunk=items[i : i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_config(self, cfg: Config, resources: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """What runs are compared by as params (``cfg.params()``, and ``extra``); where and how the run ran
        (workers, shares, the cluster's resources) as tags ``metaray.<key>``. The whole config is config.yaml."""
        self.log_params({**cfg.params(), **(extra or {})})
        w = cfg.workers
        tags = {"metaray.workers": f"{w.mode}, {w.num_workers} worker{'s' * (w.num_workers != 1)}, "
                                   f"{w.share_count} shares", **{f"metaray.{k}": str(v) for k, v in resources.items()}}
        self.log_tags(tags)

    def log_tags(self, tags: dict[str, str]) -> None:
        self._safe(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v[:8000]) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._recorded:
            # Meta-steps a crashed process already recorded are not recorded again; evaluation metrics are
            # (a resumed run that trains further is evaluated anew, at the same adaptation-step numbers).
            metrics = {k: v for k, v in metrics.items()
                       if k.startswith("eval/") or step > self._recorded.get(k, -1)}
        if metrics:
            self.writer.add(metrics, step)

    def log_evaluation(self, metrics: dict[str, float], step: int) -> None:
        """The final evaluation's summary metrics (of θ at training step ``step``); the model is linked to them.

        Logged at MLflow step 0, not at the training step: MLflow draws a metric that has only step 0 as one bar
        per run, a result to compare, where a value at step 1000 would be a one-point line chart."""
        ts = int(time.time() * 1000)
        self.writer.add(metrics, EVALUATION_STEP, ts)
        self._evaluation = [(k, float(v), ts, EVALUATION_STEP) for k, v in metrics.items()]
        self._evaluated_step = step

    def flush(self) -> None:
        """Every metric logged so far is durable (on disk) when this returns: call it before a checkpoint."""
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.put_file(Path(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self.artifacts.put_bytes(lambda p: figure.savefig(p, format="png"), f"plots/{name}.png")

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts.put_bytes(lambda p: p.write_text(text), artifact_file)

    def log_model(self, blueprint: Any, params: Any, example: Any, step: int | None = None) -> None:
        """The final model (``logged_model``: a pyfunc that adapts to a task and predicts its queries, with a
        signature and ``example`` as input example): a LoggedModel named after the run, output of the run at
        ``step`` (default: the evaluated one), with the last ``log_evaluation`` metrics linked; registered if
        configured."""
        if step is None:
            step = self._evaluated_step
        self.artifacts.put_model(lambda folder: logged_model.save(folder, blueprint, params, example),
                                 name=logged_model.model_name(self.run_name), step=step,
                                 params={k: _param_value(v) for k, v in self.cfg.params().items()},
                                 metrics=self._evaluation, register=self.cfg.tracking.registered_model)

    def sibling_curves(self, metric: str) -> dict[str, list[float]]:
        """``metric`` histories (by step) of the other finished runs in this experiment, by run name (not those
        tagged diverged)."""

        def fetch() -> dict[str, list[float]]:
            runs = self.client.search_runs([self.experiment_id],
                                           f"metrics.`{metric}` >= 0 and attributes.status = 'FINISHED'",
                                           max_results=50)
            out = {}
            for r in runs:
                if r.info.run_id != self.run_id and "metaray.diverged" not in r.data.tags:
                    hist = sorted(self.client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
                    out[r.info.run_name] = [m.value for m in hist]
            return out

        return self._safe(fetch, {}) or {}

    def close(self, status: str = "FINISHED") -> str:
        """Deliver what is left (waiting up to ``tracking.close_timeout_s``) and end the run with ``status``.
        Returns one line saying what is still undelivered and how to deliver it, or "" if nothing is."""
        metrics = self.writer.close(self.cfg.tracking.close_timeout_s)
        artifacts = len(self.artifacts.entries())
        ended = self._safe(lambda: self.client.set_terminated(self.run_id, status) or True, False)
        if not (metrics or artifacts or not ended):
            remove_folder(self.folder)
            return ""
        try:
            write_meta(self.folder, {**read_meta(self.folder), "status": status})
        except DiskFull as e:  # `metaray deliver` then leaves the run's status as the store has it
            log.warning("tracking: %s", e)
        what = [f"{metrics} metrics"] * bool(metrics) + [f"{artifacts} artifacts"] * bool(artifacts)
        what += [f"the run's status ({status})"] * (not ended)
        said = self.writer.last_error or "unreachable"  # e.g. "database or disk is full": not only outages
        return (f"tracking: not in MLflow yet (store {self.uri}: {said}): {', '.join(what)}; kept in "
                f"{self.folder}; deliver with: metaray deliver {self.run_dir}")

    def _safe(self, fn, default: Any = None) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking never kills training
            log.warning("tracking: %s failed (%s); training goes on", getattr(fn, "__name__", "call"), one_line(e, 240))
            return default


def _tags(cfg: Config, command: str, parent_run_id: str | None) -> dict[str, str]:
    tags = {
        "metaray.command": command,
        "metaray.algorithm": cfg.algorithm.name,
        "metaray.task_family": cfg.task.family,
        "metaray.backbone": cfg.model.backbone,
        "metaray.version": version(),
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def _git_commit() -> str | None:
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text[:6000]  # MLflow's limit on a param value

