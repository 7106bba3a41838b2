"""The sine results table: train every sine config, evaluate on the same 600 held-out tasks, print one table.

Each config is trained exactly as ``metaray train CONFIG --set ...`` would
(same code path), into ``--dir``; runs already finished there are re-used, so
the table can be rebuilt without retraining.

    python benchmarks/sine_results.py --steps 30000 --set workers.mode=inprocess
"""

from __future__ import annotations

import argparse
import glob

from reuse import train_or_reuse

from orchestrator.config import load_config

ORDER = ["maml", "metasgd", "mamlpp", "imaml", "fomaml", "anil", "reptile", "hypernet", "transfer", "scratch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["configs/sine-*.yaml"], help="config files or patterns")
    ap.add_argument("--steps", type=int, default=30000, help="meta-steps for every algorithm that trains")
    ap.add_argument("--dir", default="runs/sine-results")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    rows = {}
    for path in sorted({p for pattern in args.configs for p in glob.glob(pattern)}):
        cfg = load_config(path, [f"run.dir={args.dir}", *args.overrides])
        if cfg.algorithm.name != "scratch":
            cfg = load_config(path, [f"run.dir={args.dir}", f"outer.steps={args.steps}", *args.overrides])
        # Rows by config (sine-mamlpp.yaml is MAML with options): the run name without its "sine-".
        rows[cfg.run.name.removeprefix("sine-")] = (cfg, *train_or_reuse(cfg))

    print(f"\nsine regression, K=10, 600 held-out tasks, query MSE mean ± 95% CI ({args.steps} meta-steps)\n")
    evaluations = next(iter(rows.values()))[1].keys()
    for ev in evaluations:
        print(f"| {ev} | 0 steps | 1 step | 10 steps | meta-steps | train s |")
        print("|---|---|---|---|---|---|")
        for name in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else 99):
            cfg, res, t = rows[name]
            cells = [f"{res[ev]['loss'][s]['mean']:.3f} ± {res[ev]['loss'][s]['ci95']:.3f}" for s in ("0", "1", "10")]
            print(f"| {name} | " + " | ".join(cells) + f" | {cfg.outer.steps} | {t} |")
        print()


if __name__ == "__main__":
    main()
