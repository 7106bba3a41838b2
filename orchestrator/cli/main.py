"""The ``metaray`` command line.

    metaray train CONFIG [--set key.sub=value ...] [--resume]
    metaray eval RUN_DIR_OR_CHECKPOINT [--set eval.tasks=1000 ...]
    metaray sweep CONFIG [CONFIG ...] [--search 'key=loguniform(1e-3, 1)' ...] [--grid 'key=[v1, v2]' ...]
                  [--samples N] [--max-concurrent N] [--scheduler fifo|asha] [--name NAME] [--resume]
    metaray ui [--host 127.0.0.1] [--port 5000] [--uri STORE] [--create]
    metaray deliver RUN_DIR
    metaray predict MODEL_URI --support DIR --query DIR [--steps K]
    metaray --version

User mistakes (bad config, unusable checkpoint or tracking store) print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys

from orchestrator.cli import data as data_cli
from orchestrator.cli import predict as predict_cli
from orchestrator.config import ConfigError, apply_overrides, load_config, parse_config
from orchestrator.errors import RunFailed, one_line
from orchestrator.run import checkpoint
from orchestrator.run.checkpoint import CheckpointError
from orchestrator.run.interrupts import Interrupted
from orchestrator.run.launch import train
from orchestrator.run.recipe import evaluate_checkpoint
from orchestrator.sweep.plan import TRAINING_METRIC, VALIDATION_METRIC
from orchestrator.tracking.delivery import deliver
from orchestrator.tracking.store import DEFAULT_URI, TrackingError, store_file
from orchestrator.version import version
from tasks.store import DataError

USER_ERRORS = (ConfigError, CheckpointError, TrackingError, DataError)


def _overrides(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to run on (same as --set workers.address=...; "
                                     "'auto' inside a cluster); default: Ray embedded on this machine")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit 2, like every other user error (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metaray", description="Distributed meta-training on Ray, tracked in MLflow.")
    p.add_argument("--version", action="version", version=f"metaray {version()}")
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

    s = sub.add_parser("sweep", help="a sweep on Ray Tune: one `metaray train` run per trial, child MLflow runs "
                                     "of one parent run")
    s.add_argument("configs", nargs="+", help="YAML run configs, e.g. configs/sine-*.yaml (several: one trial each)")
    _overrides(s, "override a value in every trial (repeatable)")
    _address(s)
    s.add_argument("--search", action="append", default=[], metavar="KEY=SPACE",
                   help="sweep a config key (repeatable); SPACE: grid([v1, v2]) (one trial per value), "
                        "choice([v1, v2]), uniform(a, b), loguniform(a, b), randint(a, b) (a <= n < b) (a draw "
                        "per trial), e.g. --search 'algorithm.inner_lr=loguniform(1e-3, 1)'")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=[V1, V2]",
                   help="the same as --search 'KEY=grid([V1, V2])'")
    s.add_argument("--samples", type=_positive, default=1,
                   help="repeats of the grid, each with new draws of the random spaces (default 1)")
    s.add_argument("--max-concurrent", type=_positive,
                   help="trials running at once (default: as many as fit on this machine, or on the cluster)")
    s.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo",
                   help="fifo: every trial trains to the end; asha: stop poor trials at their reports (every "
                        "run.log_every steps)")
    s.add_argument("--metric", help=f"what the scheduler and 'best' compare (default: {VALIDATION_METRIC} when the "
                                    f"trials validate (eval.every), else {TRAINING_METRIC})")
    s.add_argument("--mode", choices=["min", "max"], default="min", help="minimize or maximize --metric")
    s.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name (same command)")
    s.add_argument("--register", metavar="NAME", help="register the best trial's model in the MLflow model "
                                                      "registry as a new version of NAME")
    s.add_argument("--experiment", help="MLflow experiment of the whole sweep (default: the first config's)")
    s.add_argument("--name", help="name of the sweep: its folder <run.dir>/NAME and its parent MLflow run "
                                  "(default: what it sweeps, e.g. inner_lr-sweep_sine-maml)")

    u = sub.add_parser("ui", help="serve the MLflow UI for the tracking store")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1; the UI has no login: reach it from elsewhere "
                        "through an SSH tunnel rather than serving it on the network)")
    u.add_argument("--port", type=_port, default=5000, help="port to serve on (default 5000)")
    u.add_argument("--uri", help=f"tracking store (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")
    u.add_argument("--create", action="store_true", help="start even where the store does not exist yet "
                                                        "(it is created empty)")
    u.add_argument("--experiment", help="the experiment whose runs the printed link opens (default: the one with "
                                        "the latest run)")
    d = sub.add_parser("deliver", help="send to MLflow what a run kept in its folder while the store was down")
    d.add_argument("run_dir", help="a run folder (runs/NAME)")
    predict_cli.add_parser(sub)
    data_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage mistake (already printed, on one line)
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "address", None):
        args.overrides = [*args.overrides, f"workers.address={args.address}"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            result = train(load_config(args.config, args.overrides), resume=args.resume)
            if result.diverged:
                print(f"metaray: failed: {result.diverged}", file=sys.stderr)
                return 1
        elif args.command == "eval":
            _eval(args)
        elif args.command == "sweep":
            return _sweep(args)
        elif args.command == "ui":
            return _ui(args)
        elif args.command == "deliver":
            return 0 if deliver(args.run_dir) == 0 else 1
        elif args.command == "predict":
            return predict_cli.run(args)
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
        saved = checkpoint.load(args.checkpoint).config
        # The algorithm's test-time keys (e.g. pretrain's solver) leave θ as it is: they may change too.
        test_keys = tuple(f"algorithm.{k}=" for k in type(saved.algorithm).test_keys)
        bad = [o for o in args.overrides if not o.startswith(("eval.", "workers.", "tracking.", *test_keys))]
        if bad:
            also = f", and {', '.join(k.rstrip('=') for k in test_keys)}" if test_keys else ""
            raise ConfigError(f"--set {bad[0]}: eval only takes eval.*, workers.* and tracking.* overrides{also}")
        stored = saved.model_dump(mode="json")
        cfg = parse_config(apply_overrides(stored, args.overrides), "checkpoint config + --set")
    evaluate_checkpoint(args.checkpoint, cfg)


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep.tuner import sweep  # Ray Tune takes ~1 s to import: only for sweeps

    if args.register is not None and (not args.register.strip() or set("/:") & set(args.register)):
        raise ConfigError(f"--register {args.register!r}: MLflow's model registry refuses '/' and ':' in a name; "
                          "use e.g. --register sine-maml")

    result = sweep(args.configs, args.overrides, args.grid, args.experiment, args.name, search=args.search,
                   samples=args.samples, max_concurrent=args.max_concurrent, scheduler=args.scheduler,
                   metric=args.metric, mode=args.mode, resume=args.resume, register=args.register)
    if result.failed:
        first = result.failed[0]
        print(f"metaray: failed: {len(result.failed)} of {len(result.trials)} trials failed ({first.name}: "
              f"{first.error}); the others are summarized in the parent run", file=sys.stderr)
        return 1
    return 0


def _ui(args: argparse.Namespace) -> int:
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "file:", "/", ".")):
        raise TrackingError(f"{uri!r} is a tracking server, not a store: open it in a browser instead")
    path = store_file(uri)
    if path is not None and not path.exists() and not args.create:
        raise TrackingError(f"no MLflow store at {path} ({uri}); run metaray ui where the runs were tracked, pass "
                            "--uri, or --create to start on an empty store")
    if not _port_free(args.host, args.port):
        print(f"metaray: error: port {args.port} on {args.host} is in use (another metaray ui or MLflow server?); "
              f"pass another --port, e.g. --port {args.port + 1}, or stop what serves it", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", flush=True)
    print(_runs_link(uri, base, args.experiment), flush=True)
    # One server worker: this is one researcher's UI (MLflow's default of 4 workers takes ~10 s more to start on
    # a 2-core laptop); a team sharing a store runs `mlflow server` itself.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    # Its own process group: stopping metaray ui stops the server and the workers it forks, all of them.
    # MLflow's GenAI job runner (eight more processes) serves nothing a training run logs; a user may turn it on.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(cmd, start_new_session=True, env=env)

    def stop(signum: int, frame) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return server.wait()
    except Interrupted:
        return 0  # stopping the UI is how it ends
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _stop_group(server)


def _port_free(host: str, port: int) -> bool:
    """Whether the server could listen on (host, port): checked first, because uvicorn's own failure to bind
    is a multi-line log and exit status 0."""
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# MLflow's UI opens in its GenAI mode (traces, prompts) unless the link says otherwise, whatever the experiment's
# kind tag says; the runs view of model training is the machine-learning mode.
CLASSIC_VIEW = "workflowType=machine_learning"


def _runs_link(uri: str, base: str, experiment: str | None) -> str:
    """One line: the link to the runs view of ``experiment`` (default: the one with the latest run)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        if experiment is not None:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise TrackingError(f"--experiment {experiment!r}: no such experiment in {uri}")
        else:
            ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
            latest = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
            found = client.get_experiment(latest[0].info.experiment_id) if latest else None
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - the UI still starts; only the link is generic
        return f"experiments: {base}/#/experiments?{CLASSIC_VIEW} ({one_line(e, 120)})"
    if found is None:
        return f"experiments: {base}/#/experiments?{CLASSIC_VIEW}"
    return f"runs of {found.name}: {base}/#/experiments/{found.experiment_id}/runs?{CLASSIC_VIEW}"


def _stop_group(server: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's process group; after the server has exited (or ``grace_s``), SIGKILL to whatever
    is left of the group (workers it did not take down with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


if __name__ == "__main__":
    sys.exit(main())
