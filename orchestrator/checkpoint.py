"""Checkpoints: θ, optimizer state, step, config and counters, written atomically and loaded without pickle.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the old one, so a crash at any moment leaves either the
old or the new checkpoint, never half of one. Loading uses
``torch.load(weights_only=True)``: no code from the file is executed. Because
episodes are seed-addressed, (θ, optimizer state, step, config) is the whole
state of a run: resuming continues the exact trajectory.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from learners.params import Params
from orchestrator.config import Config, ConfigError, parse_config

FORMAT = "metaray-checkpoint/1"
FILENAME = "checkpoint.pt"

# Settings that may change between a run and its resumption without changing the trajectory.
RESUMABLE_CHANGES = ("workers.", "eval.", "run.dir", "run.name", "run.checkpoint_every", "run.log_every",
                     "outer.steps", "tracking.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written for a different run."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    params: Params
    optimizer: dict[str, Any]
    config: Config
    state: dict[str, Any]  # counters and ids: faults, skipped steps, tracking run id
    path: Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: Path, *, step: int, params: Params, optimizer: dict[str, Any], config: Config,
         state: dict[str, Any]) -> None:
    payload = {
        "format": FORMAT,
        "step": step,
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optimizer": optimizer,
        "config": config.to_yaml(),
        "state": state,
    }
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
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: corrupt or not a metaray checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a metaray checkpoint (format {found!r}, expected {FORMAT!r})")
    try:
        config = parse_config(yaml.safe_load(payload["config"]), f"{path} (stored config)")
        return Checkpoint(int(payload["step"]), dict(payload["params"]), payload["optimizer"], config,
                          dict(payload.get("state", {})), path)
    except (KeyError, TypeError, ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({e})") from None


def check_resumable(ckpt: Checkpoint, cfg: Config, expected: Params) -> None:
    """Refuse to continue a checkpoint under a config that would change its trajectory."""
    old, new = ckpt.config.flat(), cfg.flat()
    differ = [k for k in sorted(set(old) | set(new))
              if not k.startswith(RESUMABLE_CHANGES) and old.get(k) != new.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} in the checkpoint vs {new.get(k)!r} now" for k in differ[:4])
        raise CheckpointError(f"{ckpt.path} was written for a different run ({shown}); "
                              "resume with the same settings or start a new run.name")
    check_params(ckpt, expected)


def check_params(ckpt: Checkpoint, expected: Params) -> None:
    got = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(f"{ckpt.path}: parameters do not match the model (e.g. {diff})")
