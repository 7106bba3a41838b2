"""The tracker of one run: MLflow's (``tracker.MlflowTracker``), or ``NullTracker`` when tracking is off.

This module does not import MLflow: a run with ``tracking.enabled: false`` never loads it, so it trains on a
machine without MLflow (a GPU machine carrying only Ray, for one). MLflow is imported when a tracker is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from orchestrator.config import Config

if TYPE_CHECKING:
    from orchestrator.tracking.tracker import MlflowTracker


class NullTracker:
    """Tracking switched off (``tracking.enabled: false``)."""

    run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": None}

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_config(self, cfg: Config, resources: dict[str, Any], extra: dict[str, Any] | None = None) -> None: ...
    def log_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_evaluation(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_model(self, blueprint: Any, params: Any, example: Any, step: int | None = None) -> None: ...
    def flush(self) -> None: ...
    def sibling_curves(self, metric: str) -> dict[str, list[float]]:
        return {}
    def close(self, status: str = "FINISHED") -> str:
        return ""


Tracker = Union["MlflowTracker", NullTracker]


def open_tracker(cfg: Config, state: dict[str, Any] | None = None, **kwargs: Any) -> Tracker:
    """The run's tracker; ``state`` (a tracker's ``state_dict()`` from a checkpoint) continues its MLflow run."""
    if not cfg.tracking.enabled:
        return NullTracker()
    from orchestrator.tracking.tracker import MlflowTracker  # MLflow loads here, for tracked runs only

    return MlflowTracker(cfg, run_id=(state or {}).get("run_id"), **kwargs)
