"""One training run from config to evaluated checkpoint: what ``metaray train`` does.

>>> from orchestrator.config import load_config
>>> result = train(load_config("configs/sine-maml.yaml", ["outer.steps=100"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learners.params import ParamSpec, Params
from orchestrator import checkpoint
from orchestrator.build import build_algorithm
from orchestrator.config import Config
from orchestrator.evaluate import Score, evaluate_all, table, to_json
from orchestrator.group import make_group
from orchestrator.learner import CentralLearner


@dataclass
class TrainResult:
    params: Params
    step: int
    faults: int
    fault_events: list[str]
    skipped_steps: int
    results: dict[str, dict[str, dict[int, Score]]]
    run_dir: Path
    metrics: list[dict[str, float]]


def train(cfg: Config, resume: bool = False, evaluate: bool = True, out=sys.stdout) -> TrainResult:
    """Meta-train per ``cfg`` (continuing the run's checkpoint when ``resume``), evaluate, save."""
    run_dir = cfg.run_dir
    ckpt_path = run_dir / checkpoint.FILENAME
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

    group = make_group(cfg)
    try:
        learner = CentralLearner(cfg, params, group, optimizer_state, step, state.get("skipped_steps", 0))
        group.faults.count = state.get("faults", 0)
        _write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        history: list[dict[str, float]] = []

        def save() -> None:
            checkpoint.save(ckpt_path, step=learner.step, params=learner.params,
                            optimizer=learner.optimizer.state_dict(), config=cfg,
                            state={"faults": group.faults.count, "skipped_steps": learner.skipped_steps})

        started = time.perf_counter()
        try:
            while learner.step < cfg.outer.steps:
                metrics = learner.meta_step()
                history.append(metrics)
                if learner.step % cfg.run.log_every == 0 or learner.step == cfg.outer.steps:
                    _progress(out, learner.step, cfg.outer.steps, metrics, time.perf_counter() - started)
                if learner.step % cfg.run.checkpoint_every == 0:
                    save()
        except KeyboardInterrupt:
            save()
            print(f"interrupted: checkpoint at step {learner.step} in {ckpt_path}; continue with --resume",
                  file=out)
            raise
        save()

        results: dict[str, Any] = {}
        if evaluate:
            results = evaluate_all(cfg, group, learner.theta())
            print(table(algorithm.name, results), file=out)
            _write_atomic(run_dir / "eval.json", json.dumps(to_json(results), indent=2))
        if group.faults.count:
            print(f"worker faults survived: {group.faults.count} (" + "; ".join(group.faults.events[-3:]) + ")",
                  file=out)
        return TrainResult(learner.params, learner.step, group.faults.count, list(group.faults.events),
                           learner.skipped_steps, results, run_dir, history)
    finally:
        group.close()


def evaluate_checkpoint(path: str | Path, overrides_cfg: Config | None = None, out=sys.stdout):
    """Evaluate a saved checkpoint (``metaray eval``) under its own config, or ``overrides_cfg``."""
    ckpt = checkpoint.load(path)
    cfg = overrides_cfg or ckpt.config
    algorithm = build_algorithm(cfg)
    checkpoint.check_params(ckpt, algorithm.init_params(0))
    group = make_group(cfg)
    try:
        theta = ParamSpec.of(ckpt.params).flatten(ckpt.params).numpy().astype(np.float32)
        results = evaluate_all(cfg, group, theta)
    finally:
        group.close()
    print(table(algorithm.name, results), file=out)
    return results


def _progress(out, step: int, total: int, m: dict[str, float], elapsed: float) -> None:
    parts = [f"step {step}/{total}"]
    for key in ("meta/loss", "inner/loss_before", "inner/acc_after"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['perf/tasks_per_s']:.0f} tasks/s")
    parts.append(f"faults {int(m['orchestrator/faults'])}")
    parts.append(f"{elapsed:.0f}s")
    print(" | ".join(parts), file=out, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
