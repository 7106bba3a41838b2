"""Train a config, or re-use the finished run in its folder: what the results scripts share."""

from __future__ import annotations

import json
import time

from orchestrator import evaluate_checkpoint, train
from orchestrator.config import Config
from orchestrator.run import checkpoint
from orchestrator.run.evaluation import to_json
from orchestrator.run.interrupts import Interrupted


def train_or_reuse(cfg: Config) -> tuple[dict, str]:
    """The run's eval.json (trained now, continued, or as already finished) and its training seconds."""
    done = cfg.run_dir / "eval.json"
    seconds = cfg.run_dir / "train_seconds.txt"
    if not (done.exists() and checkpoint.load(cfg.run_dir).step == cfg.outer.steps):
        start = time.perf_counter()
        train(cfg, resume=(cfg.run_dir / checkpoint.FILENAME).exists())
        seconds.write_text(f"{time.perf_counter() - start:.1f}\n")
    return json.loads(done.read_text()), seconds.read_text().strip() if seconds.exists() else "?"


def train_for_seconds(cfg: Config, seconds: float, evaluate: bool = True) -> tuple[dict | None, str, int]:
    """Train ``cfg`` for ``seconds`` of wall time (it stops at a step boundary, with a checkpoint), evaluate that
    checkpoint (unless ``evaluate`` is false: the caller scores it its own way), or re-use such a run: its
    evaluation, training seconds and meta-steps done."""
    done = cfg.run_dir / "eval-timed.json"
    seconds_file = cfg.run_dir / "train_seconds.txt"
    if not seconds_file.exists():
        start = time.perf_counter()
        try:
            train(cfg, evaluate=False, should_stop=lambda: time.perf_counter() - start > seconds)
        except Interrupted:
            pass  # the time is up: the checkpoint holds the last finished step
        seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
    if evaluate and not done.exists():
        done.write_text(json.dumps(to_json(evaluate_checkpoint(cfg.run_dir, cfg))))
    results = json.loads(done.read_text()) if done.exists() else None
    return results, seconds_file.read_text().strip(), checkpoint.load(cfg.run_dir).step
