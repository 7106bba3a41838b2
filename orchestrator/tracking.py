"""MLflow tracking for one ``metaray train`` / ``metaray eval``: one run, logged only by the learner.

Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow 3
refuses the plain file store unless opted in); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` override it. The store is checked before training starts: a
bad URI is a user error (exit 2). After that, tracking never kills training:
metrics go through ``MetricWriter`` in its own process (asynchronous, batched, buffered while the
store is down), and a failing artifact upload is reported and skipped.

A resumed run continues the same MLflow run (its id is kept in the
checkpoint); metric steps already recorded are not recorded again, so step
numbers stay continuous without duplicates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param

from orchestrator.config import Config
from orchestrator.errors import one_line
from orchestrator.metric_writer import MetricProcess

log = logging.getLogger("metaray")
DEFAULT_URI = "sqlite:///mlflow.db"


class TrackingError(ValueError):
    """The tracking store named by the config or environment cannot be used."""


def resolve_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"metaray-{cfg.task.family}"


class NullTracker:
    """Tracking switched off (``tracking.enabled: false``)."""

    run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": None}

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_model(self, module: Any, input_example: Any) -> None: ...
    def flush(self) -> None: ...
    def sibling_curves(self, metric: str) -> dict[str, list[float]]:
        return {}
    def close(self, status: str = "FINISHED") -> int:
        return 0


class MlflowTracker:
    def __init__(self, cfg: Config, *, run_id: str | None = None, parent_run_id: str | None = None,
                 command: str = "train", run_dir: Path | None = None):
        # Our writer retries with its own backoff; MLflow's default HTTP retries would stall a step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = resolve_uri(cfg)
        self.cfg = cfg
        try:
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment(experiment_name(cfg))
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=cfg.run.name,
                                             tags=_tags(cfg, command, parent_run_id))
                run_id = run.info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
            self._recorded = self._last_steps(run_id)
        except Exception as e:  # noqa: BLE001 - whatever the store says, it is unusable: report it in one line
            raise TrackingError(f"tracking store {self.uri!r} is not usable ({one_line(e, 240)}); start the server or fix "
                                "tracking.uri / MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db)") from None
        self.run_id = run_id
        spill = (run_dir or cfg.run_dir) / f"tracking-spill-{run_id}.jsonl"
        t = cfg.tracking
        self.writer = MetricProcess(self.uri, run_id, spill, t.flush_every_s, t.max_buffered_metrics)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            return self.client.get_experiment_by_name(name).experiment_id  # created concurrently by a sibling

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """Last recorded step per metric key (resume: those steps are not recorded twice)."""
        keys = self.client.get_run(run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this MLflow run."""
        return {"run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self._safe(lambda: self.client.get_run(self.run_id).data.params, {}) or {}
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._safe(lambda chunk=items[i : i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._recorded:
            # Meta-steps a crashed process already recorded are not recorded again; evaluation metrics are
            # (a resumed run that trains further is evaluated anew, at the same adaptation-step numbers).
            metrics = {k: v for k, v in metrics.items()
                       if k.startswith("eval/") or step > self._recorded.get(k, -1)}
        if metrics:
            self.writer.add(metrics, step)

    def flush(self) -> None:
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._safe(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_figure(self, figure: Any, name: str) -> None:
        self._safe(lambda: self.client.log_figure(self.run_id, figure, f"plots/{name}.png"))

    def log_model(self, module: Any, input_example: Any) -> None:
        """The final model as an MLflow PyTorch model (a LoggedModel with a signature)."""
        import learners

        def log() -> None:
            with _fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(module, name="model", input_example=input_example,
                                         code_paths=[str(Path(learners.__file__).parent)],
                                         pip_requirements=[f"torch=={metadata.version('torch')}"])

        self._safe(log)

    def sibling_curves(self, metric: str) -> dict[str, list[float]]:
        """``metric`` histories (by step) of the other finished runs in this experiment, by run name."""

        def fetch() -> dict[str, list[float]]:
            runs = self.client.search_runs([self.experiment_id],
                                           f"metrics.`{metric}` >= 0 and attributes.status = 'FINISHED'",
                                           max_results=50)
            out = {}
            for r in runs:
                if r.info.run_id != self.run_id:
                    hist = sorted(self.client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
                    out[r.info.run_name] = [m.value for m in hist]
            return out

        return self._safe(fetch, {}) or {}

    def close(self, status: str = "FINISHED") -> int:
        left = self.writer.close(self.cfg.tracking.close_timeout_s)
        self._safe(lambda: self.client.set_terminated(self.run_id, status))
        return left

    def _safe(self, fn, default: Any = None) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking never kills training
            log.warning("tracking: %s failed (%s); training goes on", getattr(fn, "__name__", "call"), one_line(e, 240))
            return default


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (needed by log_model) reads a process-wide URI, and setting it also sets
    $MLFLOW_TRACKING_URI: restore both, or the next run in this process would track to this store."""
    old_env, old_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def open_tracker(cfg: Config, state: dict[str, Any] | None = None, **kwargs: Any) -> MlflowTracker | NullTracker:
    """The run's tracker; ``state`` (a tracker's ``state_dict()`` from a checkpoint) continues its MLflow run."""
    if not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_id=(state or {}).get("run_id"), **kwargs)


def _tags(cfg: Config, command: str, parent_run_id: str | None) -> dict[str, str]:
    tags = {
        "metaray.command": command,
        "metaray.algorithm": cfg.algorithm.name,
        "metaray.task_family": cfg.task.family,
        "metaray.backbone": cfg.model.backbone,
        "metaray.version": _version(),
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def _version() -> str:
    try:
        return metadata.version("metaray")
    except metadata.PackageNotFoundError:
        return "unknown"


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

