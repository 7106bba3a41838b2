"""The ``metaray`` command line.

    metaray train CONFIG [--set key.sub=value ...] [--resume]
    metaray eval RUN_DIR_OR_CHECKPOINT [--set eval.tasks=1000 ...]
    metaray sweep CONFIG [CONFIG ...] [--set ...] [--grid 'key=[v1, v2]' ...] [--experiment NAME]
    metaray ui [--port 5000]
    metaray deliver RUN_DIR

User mistakes (bad config, unusable checkpoint or tracking store) print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from orchestrator import checkpoint, data_cli
from orchestrator.checkpoint import CheckpointError
from orchestrator.config import ConfigError, apply_overrides, load_config, parse_config
from orchestrator.errors import RunFailed
from orchestrator.interrupts import Interrupted
from orchestrator.run import evaluate_checkpoint, train
from orchestrator.sweep import sweep
from orchestrator.tracking import DEFAULT_URI, TrackingError, deliver
from tasks.store import DataError

USER_ERRORS = (ConfigError, CheckpointError, TrackingError, DataError)


def _overrides(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to run on (same as --set workers.address=...; "
                                     "'auto' inside a cluster); default: Ray embedded on this machine")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaray", description="Distributed meta-training on Ray, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config, evaluate, checkpoint")
    t.add_argument("config", help="YAML run config, e.g. configs/sine-maml.yaml")
    _overrides(t, "override a config value, e.g. --set outer.steps=1000 (repeatable)")
    _address(t)
    t.add_argument("--resume", action="store_true", help="continue the run's checkpoint (same trajectory, same MLflow run)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its held-out tasks (tracked as its own MLflow run)")
    e.add_argument("checkpoint", help="a run folder (runs/NAME) or a checkpoint file")
    _overrides(e, "override eval.*, workers.* or tracking.* settings, e.g. --set eval.tasks=1000")
    _address(e)

    s = sub.add_parser("sweep", help="train several configs / a grid as sibling MLflow runs under one parent")
    s.add_argument("configs", nargs="+", help="YAML run configs, e.g. configs/sine-*.yaml")
    _overrides(s, "override a value in every config (repeatable)")
    _address(s)
    s.add_argument("--grid", action="append", default=[], metavar="KEY=[V1, V2]",
                   help="one run per value (cartesian product over several --grid)")
    s.add_argument("--experiment", help="MLflow experiment of the whole sweep (default: the first config's)")
    s.add_argument("--name", help="name of the parent run (default: sweep-<date>-<time>)")

    u = sub.add_parser("ui", help="serve the MLflow UI for the tracking store on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--uri", help=f"tracking store (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")
    d = sub.add_parser("deliver", help="send to MLflow what a run kept in its folder while the store was down")
    d.add_argument("run_dir", help="a run folder (runs/NAME)")
    data_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "address", None):
        args.overrides = [*args.overrides, f"workers.address={args.address}"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            train(load_config(args.config, args.overrides), resume=args.resume)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "sweep":
            sweep(args.configs, args.overrides, args.grid, args.experiment, args.name)
        elif args.command == "ui":
            return _ui(args)
        elif args.command == "deliver":
            return 0 if deliver(args.run_dir) == 0 else 1
        elif args.command == "data":
            return data_cli.run(args)
    except USER_ERRORS as e:
        print(f"metaray: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"metaray: failed: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"metaray: stopped by {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("metaray: stopped by SIGINT", file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> None:
    cfg = None
    if args.overrides:
        bad = [o for o in args.overrides if not o.startswith(("eval.", "workers.", "tracking."))]
        if bad:
            raise ConfigError(f"--set {bad[0]}: eval only takes eval.*, workers.* and tracking.* overrides")
        stored = checkpoint.load(args.checkpoint).config.model_dump(mode="json")
        cfg = parse_config(apply_overrides(stored, args.overrides), "checkpoint config + --set")
    evaluate_checkpoint(args.checkpoint, cfg)


def _ui(args: argparse.Namespace) -> int:
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "file:", "/", ".")):
        raise TrackingError(f"{uri!r} is a tracking server, not a store: open it in a browser instead")
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
