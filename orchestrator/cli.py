"""The ``metaray`` command line.

    metaray train CONFIG [--set key.sub=value ...] [--resume]
    metaray eval RUN_DIR_OR_CHECKPOINT [--set eval.tasks=1000 ...]

User mistakes (bad config, unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.checkpoint import CheckpointError
from orchestrator.config import ConfigError, apply_overrides, load_config, parse_config

USER_ERRORS = (ConfigError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaray", description="Distributed meta-training on Ray, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config, evaluate, checkpoint")
    t.add_argument("config", help="YAML run config, e.g. configs/sine-maml.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set outer.steps=1000 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run's checkpoint (same trajectory)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its held-out tasks")
    e.add_argument("checkpoint", help="a run folder (runs/NAME) or a checkpoint file")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override eval.* or workers.* settings, e.g. --set eval.tasks=1000")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from orchestrator.run import train

            train(load_config(args.config, args.overrides), resume=args.resume)
        elif args.command == "eval":
            from orchestrator import checkpoint
            from orchestrator.run import evaluate_checkpoint

            cfg = None
            if args.overrides:
                bad = [o for o in args.overrides if not o.startswith(("eval.", "workers."))]
                if bad:
                    raise ConfigError(f"--set {bad[0]}: eval only takes eval.* and workers.* overrides")
                stored = checkpoint.load(args.checkpoint).config.model_dump(mode="json")
                cfg = parse_config(apply_overrides(stored, args.overrides), "checkpoint config + --set")
            evaluate_checkpoint(args.checkpoint, cfg)
    except USER_ERRORS as e:
        print(f"metaray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
