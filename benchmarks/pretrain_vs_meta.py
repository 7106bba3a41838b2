"""Pre-training against meta-learning on the held-out Omniglot alphabets, at equal training wall time.

Contenders, each trained for ``--seconds`` of wall time with its shipped config (one run at a time, each with the
machine to itself: in-process, torch on every core), on the small splits' 6 training alphabets:

- ``protonet``, ``metaoptnet-svm``, ``maml``: one run per test shape, from ``configs/omniglot-<alg>-<shape>.yaml``
  (MetaOptNet has no 20-way config: its 5-way 1-shot config trains, its head is written from each 20-way support
  set at test);
- ``pretrain``: ONE run of ``configs/omniglot-pretrain-20w1s.yaml`` (its training does not depend on the test
  shape), scored with every test solver (``--solvers``) on every shape.

Test shapes (``--shapes``): 5-way 1-shot and 5-way 5-shot across alphabets, and 20-way 1-shot within one alphabet
(Lake et al.'s harder protocol), on Greek and Korean (never seen in training), rotations as in training. Each
score is ``metaray eval CHECKPOINT`` (the same function) on 600 episodes (``eval.seed`` 2024: the same episodes
for every row of a column), mean ± 95% CI; MAML reads its config's last test step, the others 0 steps. Finished
runs and scores in ``--dir`` are re-used, so the table can be rebuilt without retraining.

    metaray data convert omniglot images_background_small1.zip images_background_small2.zip data/omniglot-small.arrow
    python benchmarks/pretrain_vs_meta.py --store data/omniglot-small.arrow --seconds 800
    python benchmarks/pretrain_vs_meta.py --store data/omniglot-small.arrow --seconds 800 --shapes 20w1s \\
        --contenders pretrain,protonet        # the 20-way within-alphabet question alone
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from reuse import train_for_seconds

from orchestrator import evaluate_checkpoint
from orchestrator.config import apply_overrides, load_config, parse_config
from orchestrator.run import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN = "[Japanese_(katakana), Sanskrit, Latin, Balinese, Early_Aramaic, Tagalog]"
TEST = "[Greek, Korean]"
SHAPES = {  # test task overrides per column
    "5w1s": ["task.n_way=5", "task.k_shot=1", "task.query=15", "task.within_group=false"],
    "5w5s": ["task.n_way=5", "task.k_shot=5", "task.query=15", "task.within_group=false"],
    "20w1s": ["task.n_way=20", "task.k_shot=1", "task.query=5", "task.within_group=true"],
}  # training episodes keep each config's own shape (its task.train), across alphabets
HEADING = {"5w1s": "5-way 1-shot", "5w5s": "5-way 5-shot", "20w1s": "20-way 1-shot within an alphabet"}
SOLVERS = ("centroid", "logistic", "ridge", "svm")


def training_config(contender: str, shape: str) -> Path:
    """The shipped config a contender trains with for a test shape (the test shape is applied when scoring)."""
    if contender == "pretrain":
        return ROOT / "configs" / "omniglot-pretrain-20w1s.yaml"
    if contender == "metaoptnet-svm" and shape == "20w1s":
        return ROOT / "configs" / "omniglot-metaoptnet-svm-5w1s.yaml"  # its SVM head is written from any support set
    return ROOT / "configs" / f"omniglot-{contender}-{shape}.yaml"


def common(store: str, folder: Path, name: str) -> list[str]:
    return [f"task.store={store}", f"task.split.train={TRAIN}", f"task.split.test={TEST}", "task.split.val=0.0",
            "workers.mode=inprocess", "workers.num_workers=1", "tracking.enabled=false", "outer.steps=100000000",
            "eval.every=0", "run.log_every=100", f"run.dir={folder}", f"run.name={name}"]


def score(path: Path, shape: str, solver: str | None, tasks: int) -> dict:
    """``metaray eval PATH --set <the shape> [--set algorithm.solver=...]``: acc at the config's last test step."""
    stored = checkpoint.load(path).config.model_dump(mode="json")
    sets = [*SHAPES[shape], f"eval.tasks={tasks}", "eval.seed=2024"]
    if solver:
        sets.append(f"algorithm.solver={solver}")
    cfg = parse_config(apply_overrides(stored, sets), "checkpoint config + --set")
    acc = evaluate_checkpoint(path, cfg)["test"]["acc"]
    last = max(acc)
    return {"steps": last, "mean": acc[last].mean, "ci95": acc[last].ci95}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--dir", default="runs/pretrain-vs-meta")
    ap.add_argument("--seconds", type=float, default=800.0, help="training wall time of every run")
    ap.add_argument("--contenders", default="pretrain,protonet,metaoptnet-svm,maml")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--eval-tasks", type=int, default=600, help="test episodes per cell")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more overrides of every run")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(args.dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    store = str(Path(args.store).absolute())
    shapes = args.shapes.split(",")

    scores_file = folder / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    runs = {}
    for contender in args.contenders.split(","):
        for shape in (["all"] if contender == "pretrain" else shapes):
            # MetaOptNet-SVM's 5-way 1-shot run is also its 20-way one: one training, scored on both shapes
            name = f"{contender}-{'5w1s' if training_config(contender, shape).stem.endswith('5w1s') else shape}"
            cfg = load_config(training_config(contender, shape),
                              [*common(store, folder, name), f"eval.tasks={args.eval_tasks}", *args.overrides])
            _, seconds, steps = train_for_seconds(cfg, args.seconds, evaluate=False)
            runs[name] = (cfg, seconds, steps)
            for test in shapes if contender == "pretrain" else [shape]:
                for solver in args.solvers.split(",") if contender == "pretrain" else [None]:
                    key = f"{name}/{test}/{solver or '-'}"
                    if key not in scores:
                        scores[key] = score(cfg.run_dir, test, solver, args.eval_tasks)
                        scores_file.write_text(json.dumps(scores, indent=2))

    print(f"\n{args.seconds:.0f} s of training per run on {os.cpu_count()} cores ({time.strftime('%Y-%m-%d')}); "
          f"held-out alphabets {TEST}, {args.eval_tasks} test episodes per cell, accuracy mean ± 95% CI")
    print("\n| contender | meta-steps x tasks (per shape) | " + " | ".join(HEADING[s] for s in shapes) + " |")
    print("|---|---|" + "---|" * len(shapes))
    rows: dict[str, dict[str, str]] = {}
    for key, s in scores.items():
        name, test, solver = key.split("/")
        contender = name.rsplit("-", 1)[0]
        label = f"pretrain + {solver}" if contender == "pretrain" else contender
        steps = f" ({s['steps']} steps)" if s["steps"] else ""
        rows.setdefault(label, {})[test] = f"{s['mean']:.3f} ± {s['ci95']:.3f}{steps}"
    for label, cells in rows.items():
        contender = "pretrain" if label.startswith("pretrain") else label
        done = ", ".join(f"{runs[n][2]} x {runs[n][0].outer.meta_batch_size}" for n in runs
                         if n.rsplit("-", 1)[0] == contender) or "-"
        print(f"| {label} | {done} | " + " | ".join(cells.get(s, "-") for s in shapes) + " |")


if __name__ == "__main__":
    main()
