"""Checkpoints: the union of the run's owned states, written atomically and loaded without pickle.

A checkpoint holds the config and the ``state_dict()`` of each object that owns part of the
run: the learner (θ, optimizer, step, skipped steps, LR schedule), the worker group's fault
counters, and the tracker (its MLflow run). Because episodes are seed-addressed, that is the
whole state of a run: resuming continues the exact trajectory.

The file is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one (``atomic.write_atomic``), so a crash at any moment leaves the old or the new
checkpoint, never half of one. Loading uses ``torch.load(weights_only=True)``: no code from the
file is executed. A θ that is not finite is never written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from learners.params import Params
from learners.registry import DEFAULT_ALGORITHM, variant
from orchestrator.atomic import write_atomic
from orchestrator.config import Config, ConfigError, parse_config
from orchestrator.config.lr_schedule import CosineSchedule

FORMAT = "metaray-checkpoint/2"
FORMAT_V1 = "metaray-checkpoint/1"
FILENAME = "checkpoint.pt"

# Settings that may change between a run and its resumption without changing the trajectory.
# The share count is not one of them: it decides how the gradient sums are rounded (checked apart).
RESUMABLE_CHANGES = ("workers.", "eval.", "run.dir", "run.name", "run.checkpoint_every", "run.log_every",
                     "outer.steps", "tracking.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written for a different run."""


@dataclass(frozen=True)
class Checkpoint:
    config: Config
    learner: dict[str, Any]  # CentralLearner.state_dict()
    faults: dict[str, int]  # FaultLog.state_dict()
    tracker: dict[str, Any]  # the tracker's state_dict()
    path: Path
    selection: dict[str, Any] | None = None  # ModelSelection.state_dict() when the run validates

    @property
    def step(self) -> int:
        return int(self.learner["step"])

    @property
    def params(self) -> Params:
        return self.learner["params"]


def save(path: Path, config: Config, *, learner: dict[str, Any], faults: dict[str, int],
         tracker: dict[str, Any], selection: dict[str, Any] | None = None) -> None:
    params = learner["params"]
    if not all(bool(v.isfinite().all()) for v in params.values()):
        raise ValueError(f"refusing to checkpoint a non-finite θ to {path}")  # the learner never makes one
    payload = {"format": FORMAT, "config": config.to_yaml(),
               "learner": {**learner, "params": {k: v.detach().cpu() for k, v in params.items()}},
               "faults": faults, "tracker": tracker, "selection": selection}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def resolve(path_or_run: str | Path) -> Path:
    """A checkpoint file, or the checkpoint inside a run folder."""
    p = Path(path_or_run)
    return p / FILENAME if p.is_dir() else p


def load(path_or_run: str | Path) -> Checkpoint:
    path = resolve(path_or_run)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        # Not torch's own message: it suggests weights_only=False, i.e. running code from the file.
        raise CheckpointError(f"{path}: not a metaray checkpoint (torch cannot read it: {type(e).__name__}); "
                              "give the checkpoint.pt of a run folder") from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, FORMAT_V1):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a metaray checkpoint (format {found!r}, expected {FORMAT!r})")
    try:
        if payload["format"] == FORMAT_V1:
            payload = _from_v1(payload)
        config = parse_config(yaml.safe_load(payload["config"]), f"{path} (stored config)")
        learner = dict(payload["learner"])
        learner["params"] = dict(learner["params"])
        int(learner["step"])
        return Checkpoint(config, learner, dict(payload["faults"]), dict(payload["tracker"]), path,
                          payload.get("selection"))
    except (KeyError, TypeError, ValueError, ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({e})") from None


def _from_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 (one flat dict) in format 2; its config loses the keys metaray no longer has."""
    state = payload.get("state", {})
    config = yaml.safe_load(payload["config"])
    config.get("task", {}).pop("points_per_task", None)
    config.get("workers", {}).pop("fault_injection", None)
    algorithm = config.get("algorithm", {})
    known = variant(algorithm.get("name", DEFAULT_ALGORITHM)).model_fields
    config["algorithm"] = {k: v for k, v in algorithm.items() if k in known}  # v1 stored every algorithm's knobs
    return {"config": yaml.safe_dump(config, sort_keys=False),
            "learner": {"params": payload["params"], "optimizer": payload["optimizer"], "step": payload["step"],
                        "skipped_steps": state.get("skipped_steps", 0)},
            "faults": {"count": state.get("faults", 0), "stragglers": state.get("stragglers", 0)},
            "tracker": {"run_id": state.get("mlflow_run_id")}}


def check_resumable(ckpt: Checkpoint, cfg: Config, expected: Params) -> None:
    """Refuse to continue a checkpoint under a config that would change its trajectory."""
    old, new = ckpt.config.flat(), cfg.flat()
    differ = [f"{k}: {old.get(k)!r} in the checkpoint vs {new.get(k)!r} now" for k in sorted(set(old) | set(new))
              if not k.startswith(RESUMABLE_CHANGES) and old.get(k) != new.get(k)]
    old_s, new_s = ckpt.config.outer, cfg.outer
    if isinstance(new_s.schedule, CosineSchedule) and new_s.schedule.total_steps is None and old_s.steps != new_s.steps:
        differ.append(f"outer.steps: {old_s.steps} in the checkpoint vs {new_s.steps} now, and the cosine schedule "
                      f"ends at outer.steps (set outer.schedule.total_steps: {old_s.steps} to train longer on the "
                      "same schedule)")
    old_shares, new_shares = ckpt.config.workers.share_count, cfg.workers.share_count
    if old_shares != new_shares:
        differ.append(f"workers.shares: {old_shares} in the checkpoint vs {new_shares} now (set workers.shares: "
                      f"{old_shares} to keep the checkpoint's cut of each meta-batch)")
    if differ:
        raise CheckpointError(f"{ckpt.path} was written for a different run ({', '.join(differ[:4])}); "
                              "resume with the same settings or start a new run.name")
    check_params(ckpt, expected)


def check_params(ckpt: Checkpoint, expected: Params) -> None:
    got = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(f"{ckpt.path}: parameters do not match the model (e.g. {diff})")
