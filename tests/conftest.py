"""Shared fixtures: one real local Ray for the session, tiny configs, a seeded generator; and a check that the
session leaves no process behind."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from orchestrator.config import Config, parse_config

SESSION_MARK = "METARAY_TEST_SESSION"  # in the environment of every process the session starts


def pytest_configure(config):
    os.environ[SESSION_MARK] = f"{os.getpid()}.{time.time_ns()}"


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process started by the session outlived it (after every fixture's teardown): its
    children, and any process carrying the session's mark, re-parented or not. Then end them."""
    mark = f"{SESSION_MARK}={os.environ.get(SESSION_MARK)}".encode()
    deadline = time.monotonic() + 15  # e.g. Ray's processes take a few seconds to exit after ray.shutdown
    left = _session_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_processes(mark)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        lines = [f"  pid {pid}: {cmd}" for pid, cmd in left.items()]
        print("\nFAILED: processes left behind by the test session:\n" + "\n".join(lines))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _session_processes(mark: bytes) -> dict[int, str]:
    """Live processes (not zombies) whose parent is this process or whose environment holds ``mark``."""
    me, out = os.getpid(), {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(proc.name)
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if pid == me or stat[0] == "Z":
                continue
            if int(stat[1]) == me or mark in (proc / "environ").read_bytes().split(b"\0"):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "multiprocessing.resource_tracker" not in cmd:  # pytest's own helper; it ends with pytest
                    out[pid] = cmd[:200]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return out


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every run of the session (CLI subprocesses included) tracks into one real SQLite store, never ./mlflow.db.

    One store for the session: creating MLflow's tables costs a second or two per new database.
    """
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(folder)  # MLflow puts a SQLite store's artifacts under ./mlruns: keep them out of the checkout
    yield uri
    os.chdir(cwd)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def _ray_session():
    from orchestrator.workers.ray_session import shutdown

    yield
    shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A real embedded Ray as metaray starts it (on 127.0.0.1 only, token auth on as by default), shared by the
    tests until one needs another cluster."""
    import ray

    from orchestrator.workers.ray_session import start_embedded

    if not ray.is_initialized():
        start_embedded(max(2, os.cpu_count() or 1))
    return ray


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small tensors: on a busy 2-core machine a second OpenMP thread only adds spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def drill(monkeypatch):
    """``drill(worker=1, step=2, action="exit")`` makes that Ray worker fail on purpose (METARAY_FAULT_DRILL)."""
    import json

    from orchestrator.workers.faults import DRILL_ENV

    def set_drill(**spec):
        monkeypatch.setenv(DRILL_ENV, json.dumps(spec))

    return set_drill


def flat(params) -> torch.Tensor:
    """A parameter dict as one vector, in its own order."""
    return torch.cat([v.reshape(-1) for v in params.values()])


def assert_directional_derivative(loss, params, grads, seed: int, rel_tol: float, eps: float = 1e-6) -> None:
    """<grads, d> equals the central finite difference of ``loss`` (a parameter dict -> float) along a random d.

    ``d`` has one standard normal tensor per parameter, each drawn from a fresh generator seeded ``seed``.
    """
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=v.dtype)
                 for k, v in params.items()}
    fd = (loss({k: params[k] + eps * direction[k] for k in params})
          - loss({k: params[k] - eps * direction[k] for k in params})) / (2 * eps)
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)
    assert math.isclose(analytic, fd, rel_tol=rel_tol), (analytic, fd)


def tiny_config(tmp_path, **sections) -> Config:
    """A small, fast sine config rooted in tmp_path; ``sections`` override top-level sections. Tracked only when
    ``sections`` has a tracking section."""
    data = {
        "run": {"name": "tiny", "dir": str(tmp_path / "runs"), "checkpoint_every": 2, "log_every": 1000},
        "task": {"k_shot": 5, "query": 5},
        "model": {"hidden": [16, 16]},
        "algorithm": {"name": "maml", "inner_steps": 1, "inner_lr": 0.01},
        "outer": {"meta_batch_size": 8, "steps": 5, "lr": 0.001},
        "workers": {"mode": "inprocess", "num_workers": 2},
        "eval": {"tasks": 20, "steps": [0, 1], "batch_tasks": 10},
        "tracking": {"plots": False, "log_model": False, "log_checkpoint": False},
    }
    for section, values in sections.items():
        base = data.get(section, {})
        if section == "algorithm":  # keep only the defaults the chosen algorithm has
            from learners.registry import variant

            known = variant(values.get("name", "maml")).model_fields
            base = {k: v for k, v in base.items() if k in known}
        data[section] = {**base, **values}
    if "tracking" not in sections:
        # Tracking is the subject of the tests that pass a tracking section. Elsewhere it only cost time: each
        # tracked run starts a writer process that imports MLflow (3-4 s of a 2-core machine, ~35 runs here).
        data["tracking"]["enabled"] = False
    return parse_config(data)


@contextlib.contextmanager
def two_node_cluster(**head_args):
    """A real Ray cluster on this machine: a head without CPUs on 127.0.0.2 (like a real cluster's) and two 1-CPU
    worker nodes on 127.0.0.3-4; yields (cluster, worker nodes). The session's embedded Ray is shut down first
    and comes back for later tests; everything started here is shut down on the way out."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.workers.ray_session import shutdown

    shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.2", **head_args})
    try:
        yield c, [c.add_node(num_cpus=1, node_ip_address=f"127.0.0.{3 + i}") for i in range(2)]
    finally:
        ray.shutdown()
        c.shutdown()
