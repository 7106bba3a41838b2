"""What validation while training costs: mean meta-step time, mean validation time, overhead per ``eval.every``.

Runs a short real training (``orchestrator.run.recipe.train``, in-process, one torch thread: what one worker with
``num_cpus: 1`` does) of each config on a synthetic Omniglot-shaped store, validating every ``--every`` steps,
tracked in a throw-away MLflow store. The run logs ``perf/step_s`` at every meta-step and ``perf/val_s`` at every
validation; both are read back from MLflow. The overhead of validating every E steps is
``val_s / (E * step_s)``: validation scores ``eval.val_tasks`` episodes of the evaluation shape (forward passes
only, plus the adaptation steps of ``max(eval.steps)`` for the MAML family), a step trains one meta-batch
of the training shape, so the ratio depends on the config, not on the machine's speed. On a machine shared with
other work, both times swing with the load alike; the ratio is steadier than either.

The store has Omniglot's shape (28x28 greyscale, 20 drawings per character, 20 alphabets of 20 characters;
``benchmarks/augmentation.py``), split by alphabet 12/4/4 for train/val/test: costs depend on shapes, not pixels.

    python benchmarks/validation_cost.py [--config configs/omniglot-protonet-20w1s.yaml ...] [--steps 30] \\
        [--every 10] [--set eval.val_tasks=100]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

import torch
from augmentation import synthetic_omniglot
from mlflow import MlflowClient

from orchestrator import train
from orchestrator.config import load_config

EVERY = (10, 50, 100, 500, 1000, 2000)


def measure(config: str, store: Path, folder: Path, steps: int, every: int, sets: list[str]) -> dict:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = load_config(config, [
        f"task.store={store}", "task.split={by: group, train: 0.6, val: 0.2, test: 0.2, seed: 0}",
        "workers.mode=inprocess", "workers.num_workers=1", f"outer.steps={steps}", f"eval.every={every}",
        "eval.patience=null", f"run.dir={folder}", f"run.checkpoint_every={10 * steps}",
        f"tracking.uri={uri}", "tracking.plots=false", "tracking.log_model=false", "tracking.log_checkpoint=false",
        *sets])
    result = train(cfg, evaluate=False, out=io.StringIO())
    client = MlflowClient(uri)
    step_s = [m.value for m in sorted(client.get_metric_history(result.run_id, "perf/step_s"), key=lambda m: m.step)]
    val_s = [m.value for m in client.get_metric_history(result.run_id, "perf/val_s")]
    t, tr = cfg.task, cfg.task.train
    return {"config": Path(config).stem, "val_tasks": cfg.eval.val_tasks,
            "train": f"{tr.n_way or t.n_way}w{tr.k_shot or t.k_shot}s x {cfg.outer.meta_batch_size}",
            "val": f"{t.n_way}w{t.k_shot}s{t.query}q, {max(cfg.eval.steps)} steps",
            "steps": len(step_s), "validations": len(val_s),
            "step_s": statistics.mean(step_s[1:]),  # the first step pays for warm-up
            "val_s": statistics.mean(val_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", help="repeatable; default configs/omniglot-protonet-20w1s.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10, help="validate every this many steps while measuring")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = args.config or [str(Path(__file__).resolve().parent.parent / "configs/omniglot-protonet-20w1s.yaml")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_omniglot(Path(tmp) / "omniglot.arrow")
        for i, config in enumerate(configs):
            folder = Path(tmp) / f"run{i}"
            folder.mkdir()
            rows.append(measure(config, store, folder, args.steps, args.every, args.overrides))
            r = rows[-1]
            print(f"{r['config']}: {r['steps']} steps, {r['validations']} validations, step {r['step_s']:.3f} s, "
                  f"validation {r['val_s']:.3f} s", flush=True)
    print("\n| config | training step | validation (val_tasks) | mean step s | mean validation s | "
          "validation / step | " + " | ".join(f"overhead, every {e}" for e in EVERY) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(EVERY))
    for r in rows:
        ratio = r["val_s"] / r["step_s"]
        print(f"| {r['config']} | {r['train']} | {r['val']} ({r['val_tasks']}) | {r['step_s']:.3f} | {r['val_s']:.3f} | "
              f"{ratio:.1f} | " + " | ".join(f"{ratio / e:.1%}" for e in EVERY) + " |")


if __name__ == "__main__":
    main()
