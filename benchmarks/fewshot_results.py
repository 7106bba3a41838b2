"""Few-shot image results on a converted store: train several configs, score each on the held-out classes.

Every run trains exactly as ``metaray train CONFIG --set ...`` (same code path) and is evaluated on
``eval.tasks`` episodes of the held-out split (600 by default), mean ± 95% CI. Finished runs in
``--dir`` are re-used, so the table can be rebuilt without retraining.

    python benchmarks/fewshot_results.py --store data/omniglot.arrow \\
        --config configs/omniglot-protonet-5w1s.yaml --config configs/omniglot-maml-5w1s.yaml:fomaml \\
        --set outer.steps=2000 --set 'task.split.test=[Greek, Korean]' --set 'task.split.train=[...]'

With ``--seconds S`` every run trains for S seconds of wall time instead (comparisons at equal training time).
"""

from __future__ import annotations

import argparse

from reuse import train_for_seconds, train_or_reuse

from orchestrator.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--config", action="append", required=True,
                    help="CONFIG[:ALGORITHM[:STEPS]] (repeatable); ALGORITHM overrides algorithm.name")
    ap.add_argument("--dir", default="runs/fewshot-results")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seconds", type=float, help="train each run for this wall time instead of its outer.steps")
    args = ap.parse_args()

    rows = []
    for spec in args.config:
        path, *rest = spec.split(":")
        sets = [f"task.store={args.store}", f"run.dir={args.dir}", *args.overrides]
        base = load_config(path, sets)
        if rest and rest[0]:
            sets += [f"algorithm.name={rest[0]}", f"run.name={base.run.name.replace(base.algorithm.name, rest[0])}"]
        if len(rest) > 1:
            sets.append(f"outer.steps={rest[1]}")
        cfg = load_config(path, sets)
        if args.seconds:
            res, secs, steps = train_for_seconds(cfg, args.seconds)
        else:
            (res, secs), steps = train_or_reuse(cfg), cfg.outer.steps
        rows.append((cfg, res["test"], secs, steps))

    print("\n| run | way-shot | algorithm | meta-steps x tasks | test accuracy (0 steps) | after adaptation steps | train s |")
    print("|---|---|---|---|---|---|---|")
    for cfg, res, secs, done in rows:
        acc = res["acc"]
        steps = sorted(acc, key=int)
        first = acc[steps[0]]
        later = ", ".join(f"{s}: {acc[s]['mean']:.3f} ± {acc[s]['ci95']:.3f}" for s in steps[1:])
        t = cfg.task
        print(f"| {cfg.run.name} | {t.n_way}-{t.k_shot} | {cfg.algorithm.name} | {done} x "
              f"{cfg.outer.meta_batch_size} | {first['mean']:.3f} ± {first['ci95']:.3f} | {later or '-'} | {secs} |")


if __name__ == "__main__":
    main()
