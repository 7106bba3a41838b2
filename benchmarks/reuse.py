"""Train a config, or re-use the finished run in its folder: what the results scripts share."""

from __future__ import annotations

import json
import time

from orchestrator import checkpoint
from orchestrator.config import Config
from orchestrator.run import train


def train_or_reuse(cfg: Config) -> tuple[dict, str]:
    """The run's eval.json (trained now, continued, or as already finished) and its training seconds."""
    done = cfg.run_dir / "eval.json"
    seconds = cfg.run_dir / "train_seconds.txt"
    if not (done.exists() and checkpoint.load(cfg.run_dir).step == cfg.outer.steps):
        start = time.perf_counter()
        train(cfg, resume=(cfg.run_dir / checkpoint.FILENAME).exists())
        seconds.write_text(f"{time.perf_counter() - start:.1f}\n")
    return json.loads(done.read_text()), seconds.read_text().strip() if seconds.exists() else "?"
