"""Artifacts (files, figures, tables, the model) queued in the run folder, delivered when the store takes them.

The learner never waits for the store: ``put_*`` writes the artifact into ``<tracking folder>/outbox/<n>/``
(a hard link for a file, so a checkpoint replaced later keeps this version; a PNG for a figure; an MLflow
model folder for the model) with an ``entry.json`` saying where it goes, and publishes it with one
rename. The writer process delivers entries in order (``deliver``) and deletes each once the store has
it, so an outage only delays them, and what is left when the run ends is delivered by the next writer
on the folder (``--resume``, ``metaray deliver``). A model entry records its progress, so delivering it
again after an interruption does not create a second LoggedModel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import one_line, raise_if_full

log = logging.getLogger("metaray")


class ArtifactQueue:
    def __init__(self, folder: Path):
        self.folder = folder
        self._n = max((int(p.name) for p in self.entries()), default=0)

    def entries(self) -> list[Path]:
        """Published entries not yet delivered, oldest first."""
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.isdigit())

    def put_file(self, path: Path, artifact_path: str | None = None) -> None:
        def fill(entry: Path) -> dict[str, Any]:
            target = entry / Path(path).name
            try:
                os.link(path, target)  # this version, even if the file is replaced later (checkpoints are)
            except OSError:
                shutil.copy2(path, target)
            return {"kind": "file", "file": target.name, "artifact_path": artifact_path}

        self._publish(fill)

    def put_bytes(self, write: Callable[[Path], None], artifact_file: str) -> None:
        """An artifact made here (``write(path)`` creates it), stored as ``artifact_file`` (e.g. plots/x.png)."""
        folder, _, name = artifact_file.rpartition("/")

        def fill(entry: Path) -> dict[str, Any]:
            write(entry / name)
            return {"kind": "file", "file": name, "artifact_path": folder or None}

        self._publish(fill)

    def put_model(self, save: Callable[[Path], None], *, name: str, step: int, params: dict[str, str],
                  metrics: list[tuple[str, float, int, int]], register: str | None) -> None:
        """The model as an MLflow model folder (``save(folder)`` writes it), to become a LoggedModel named
        ``name`` with ``metrics`` (key, value, timestamp_ms, step) linked, registered as ``register`` if given."""

        def fill(entry: Path) -> dict[str, Any]:
            save(entry / "model")
            return {"kind": "model", "name": name, "step": step, "params": params, "metrics": metrics,
                    "register": register}

        self._publish(fill)

    def _publish(self, fill: Callable[[Path], dict[str, Any]]) -> None:
        self._n += 1
        tmp = self.folder / f".{self._n:06d}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "entry.json").write_text(json.dumps(fill(tmp)))
            os.replace(tmp, self.folder / f"{self._n:06d}")
        except Exception as e:  # noqa: BLE001 - tracking never kills training; say what is missing
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise_if_full(e, tmp)  # but a full disk stops the run: its checkpoints are next
            log.warning("tracking: could not queue an artifact in %s (%s); it will be missing", self.folder,
                        one_line(e, 240))


def describe(entry: Path) -> str:
    """What an entry holds, in words: ``the model 'NAME'`` or ``the artifact plots/x.png``."""
    try:
        meta = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError):
        return f"the artifact in {entry}"
    if meta["kind"] == "model":
        return f"the model {meta['name']!r}"
    return f"the artifact {'/'.join(p for p in (meta['artifact_path'], meta['file']) if p)}"


def deliver(entry: Path, client: Any, run_id: str, experiment_id: str) -> None:
    """Send one entry to the store and delete it (raises whatever the store raises; the entry then stays)."""
    meta = json.loads((entry / "entry.json").read_text())
    if meta["kind"] == "file":
        client.log_artifact(run_id, str(entry / meta["file"]), meta["artifact_path"])
    else:
        _deliver_model(entry, meta, client, run_id, experiment_id)
    shutil.rmtree(entry)


def _deliver_model(entry: Path, meta: dict[str, Any], client: Any, run_id: str, experiment_id: str) -> None:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    progress_file = entry / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"done": []}

    def mark(step: str) -> None:
        progress["done"].append(step)
        progress_file.write_text(json.dumps(progress))

    if "model_id" not in progress:
        model = client.create_logged_model(experiment_id, name=meta["name"], source_run_id=run_id,
                                           params=meta["params"])
        progress["model_id"] = model.model_id
        progress_file.write_text(json.dumps(progress))
    model_id = progress["model_id"]
    done = progress["done"]
    if "artifacts" not in done:
        folder = entry / "model"
        mlmodel = Model.load(str(folder))
        model = client.get_logged_model(model_id)
        mlmodel.model_id, mlmodel.run_id, mlmodel.artifact_path = model_id, run_id, model.artifact_location
        mlmodel.save(str(folder / "MLmodel"))
        client.log_model_artifacts(model_id, str(folder))
        mark("artifacts")
    if "outputs" not in done:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, meta["step"])])
        mark("outputs")
    if "ready" not in done:
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        mark("ready")
    if "metrics" not in done and meta["metrics"]:
        # The same (key, value, timestamp, step) as the run's own copies, so the run keeps one of each.
        linked = [Metric(k, v, ts, step, model_id=model_id) for k, v, ts, step in meta["metrics"]]
        for i in range(0, len(linked), 1000):
            client.log_batch(run_id, metrics=linked[i : i + 1000])
        mark("metrics")
    if "registered" not in done and meta["register"]:
        register_model(client, model_id, meta["register"], run_id)
        mark("registered")


def register_model(client: Any, model_id: str, name: str, run_id: str | None = None) -> str:
    """Register LoggedModel ``model_id`` as a new version of registered model ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          await_creation_for=0)
    return str(version.version)
