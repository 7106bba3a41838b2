"""ProtoNet on Omniglot, 20-way 1-shot within one alphabet: the config shipped before the recipes against the
papers' recipe, at equal training wall time on held-out alphabets.

Contenders (each ``configs/omniglot-protonet-20w1s.yaml`` plus overrides):

- ``before``: the config as shipped before the recipes (commit c9b5e97): 20-way training episodes, meta-batch 4,
  constant Adam 1e-3.
- ``recipe``: the shipped config (Snell et al.): 60-way training episodes, one per step, Adam 1e-3 halved every
  2000 steps.
- ``recipe-affine``: the same with Omniglot's random affine distortions on training images.
- ``recipe-affine-val``: the same, with one training alphabet (Tagalog) moved to a validation split, validated
  every ``--val-every`` steps; scored on ``best.pt`` (and on its last checkpoint, for comparison).

All train on the same 6 alphabets (5 for the validated one) and are tested on Greek and Korean, never seen in
training. Equal wall time on a shared machine: all contenders start together (so they share the machine's load),
each as one in-process ``metaray train`` with one torch thread and a step budget it cannot reach, and after
``--seconds`` each gets SIGTERM, which stops it at the next step boundary with a checkpoint (exit 143). With
``--legs N`` the contest runs N such legs, each continuing every run from its checkpoint (``--resume``, the exact
trajectory), which is how a contest is extended. Steps reached, each process's CPU seconds and the load average
are recorded per leg in ``<dir>/contest.json``. Then each checkpoint is scored as ``metaray eval CHECKPOINT``
does (the same function) on 600 test episodes of 20-way 1-shot within one alphabet (the runs' own evaluation task, rotated characters counting as
classes, as in training); the contenders named by ``--probes`` also as ``metaray eval CHECKPOINT --set
eval.probes=...`` on the same without rotations (Lake et al.'s protocol), and across alphabets 20-way 1-shot,
5-way 1-shot and 5-way 5-shot (15 queries per class; the model was trained 1-shot). Finished phases are
re-used, so the table can be rebuilt without retraining.

    metaray data convert omniglot images_background_small1.zip images_background_small2.zip data/omniglot-small.arrow
    nice -n 5 python benchmarks/omniglot_recipe.py --store data/omniglot-small.arrow --seconds 3600 --legs 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator import evaluate_checkpoint
from orchestrator.config import apply_overrides, load_config, parse_config
from orchestrator.run import checkpoint
from orchestrator.run.selection import BEST

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "omniglot-protonet-20w1s.yaml"
TRAIN = ["Japanese_(katakana)", "Sanskrit", "Latin", "Balinese", "Early_Aramaic", "Tagalog"]
TEST = ["Greek", "Korean"]
VAL = "Tagalog"
AFFINE = "task.augment={affine: {degrees: 10, shear: 10, scale: [0.9, 1.1], translate: 0.1}}"


def names(groups: list[str]) -> str:
    return "[" + ", ".join(groups) + "]"


def contenders(val_every: int) -> dict[str, list[str]]:
    """Each contender's overrides of CONFIG."""
    recipe: list[str] = []
    return {
        "before": ["task.train.n_way=null", "outer.meta_batch_size=4", "outer.schedule={kind: constant}"],
        "recipe": recipe,
        "recipe-affine": [*recipe, AFFINE],
        "recipe-affine-val": [*recipe, AFFINE, f"task.split.train={names([a for a in TRAIN if a != VAL])}",
                              f"task.split.val=[{VAL}]", f"eval.every={val_every}", "eval.val_tasks=100"],
    }


# Evaluations besides the runs' own (20-way 1-shot within one alphabet, rotations as in training).
PROBES = ("eval.probes={within20-norot: {rotations: false}, across20: {within_group: false}, "
          "across5: {n_way: 5, query: 15, within_group: false}, "
          "across5-5shot: {n_way: 5, k_shot: 5, query: 15, within_group: false}}")
COLUMNS = [("test", "20-way within"), ("within20-norot", "20-way within, no rotations"),
           ("across20", "20-way across"), ("across5", "5-way 1-shot across"), ("across5-5shot", "5-way 5-shot across")]


def common(store: str, folder: Path) -> list[str]:
    return [f"task.store={store}", f"task.split.train={names(TRAIN)}", f"task.split.test={names(TEST)}",
            "task.within_group=true", "task.train.within_group=false",  # within-alphabet tests, training as configured
            "workers.mode=inprocess", "workers.num_workers=1", "tracking.enabled=false",
            "outer.steps=100000000", "run.log_every=50", f"run.dir={folder}"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def leg(store: str, folder: Path, seconds: float, val_every: int, resume: bool, only: list[str]) -> dict:
    """Train every contender at once for ``seconds`` of wall time (continuing their checkpoints when ``resume``);
    the steps they reach, their CPU seconds, and the machine's load meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {name: [*common(store, folder), f"run.name={name}", *sets] for name, sets in contenders(val_every).items()
            if name in only}
    for sets in runs.values():
        load_config(CONFIG, sets)  # a bad override fails here, before anything runs
    procs = {}
    try:
        for name, sets in runs.items():
            cmd = [sys.executable, "-m", "orchestrator.cli", "train", str(CONFIG), *(["--resume"] if resume else [])]
            for s in sets:
                cmd += ["--set", s]
            log = open(folder / f"{name}.log", "a")
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)
        start, load = time.monotonic(), []
        while (left := seconds - (time.monotonic() - start)) > 0:
            time.sleep(min(30.0, left))
            load.append(os.getloadavg()[0])
        cpu = {name: cpu_seconds(p.pid) for name, (p, _) in procs.items()}
    finally:
        for p, _ in procs.values():  # also when this script fails or is interrupted: no run is left behind
            p.send_signal(signal.SIGTERM)
    out = {"seconds": seconds, "load_1min": {"mean": sum(load) / len(load), "min": min(load), "max": max(load)},
           "runs": {}}
    for name, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        ckpt = checkpoint.load(folder / name)
        out["runs"][name] = {"exit": rc, "steps": ckpt.step, "cpu_s": round(cpu[name], 1),
                             "tasks_per_step": ckpt.config.outer.meta_batch_size,
                             "best_step": (ckpt.selection or {}).get("best_step")}
    return out


def score(path: Path, probes: bool) -> dict:
    """``metaray eval PATH [--set eval.probes=...]``: {evaluation: (mean acc, ci95)}."""
    cfg = None
    if probes:
        stored = checkpoint.load(path).config.model_dump(mode="json")
        cfg = parse_config(apply_overrides(stored, [PROBES]), "checkpoint config + --set")
    results = evaluate_checkpoint(path, cfg)
    return {ev: (m["acc"][0].mean, m["acc"][0].ci95) for ev, m in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--dir", default="runs/omniglot-recipe")
    ap.add_argument("--seconds", type=float, default=3600.0, help="training wall time of every contender, per leg")
    ap.add_argument("--legs", type=int, default=1, help="legs of --seconds, each continuing the runs (--resume)")
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--contenders", default=",".join(contenders(0)), help="which contenders run")
    ap.add_argument("--probes", default="before,recipe", help="contenders also scored on the other protocols")
    args = ap.parse_args()
    folder = Path(args.dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)

    done = folder / "contest.json"
    legs = json.loads(done.read_text()) if done.exists() else []
    while len(legs) < args.legs:
        legs.append(leg(str(Path(args.store).absolute()), folder, args.seconds, args.val_every, resume=bool(legs),
                        only=args.contenders.split(",")))
        done.write_text(json.dumps(legs, indent=2))
    runs = legs[-1]["runs"]
    scores_file = folder / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    probed = args.probes.split(",")
    for name in runs:
        for ckpt in (checkpoint.FILENAME, BEST):
            key = f"{name}/{ckpt}"
            if key not in scores and (folder / name / ckpt).exists():
                scores[key] = score(folder / name / ckpt, name in probed)
                scores_file.write_text(json.dumps(scores, indent=2))

    seconds = sum(g["seconds"] for g in legs)
    load = [g["load_1min"] for g in legs]
    print(f"\n{seconds:.0f} s of training each ({len(legs)} leg(s)), all at once on {os.cpu_count()} cores; 1-min load "
          f"average {sum(g['mean'] for g in load) / len(load):.1f} (min {min(g['min'] for g in load):.1f}, max "
          f"{max(g['max'] for g in load):.1f}); test accuracy on 600 episodes of {' and '.join(TEST)}, mean ± 95% CI")
    print("\n| contender | checkpoint | steps x tasks | CPU s | " + " | ".join(c for _, c in COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLUMNS))
    base = scores.get(f"before/{checkpoint.FILENAME}")
    for key, by_eval in scores.items():
        name, ckpt = key.split("/")
        run = runs[name]
        step = run["best_step"] if ckpt == BEST else run["steps"]
        cells = []
        for ev, _ in COLUMNS:
            if ev not in by_eval:
                cells.append("-")
                continue
            mean, ci = by_eval[ev]
            versus = base and ev in base and name != "before"
            ratio = f" (error x{(1 - mean) / (1 - base[ev][0]):.2f})" if versus else ""
            cells.append(f"{mean:.3f} ± {ci:.3f}{ratio}")
        cpu = sum(g["runs"][name]["cpu_s"] for g in legs)
        print(f"| {name} | {ckpt} | {step} x {run['tasks_per_step']} | {cpu:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
