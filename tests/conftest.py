"""Shared fixtures: one real local Ray for the session, tiny configs, a seeded generator."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from orchestrator.config import Config, parse_config


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
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A real embedded Ray (token auth on, as by default), shared by the tests until one needs another cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")
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

    from orchestrator.worker import DRILL_ENV

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
    """A small, fast sine config rooted in tmp_path; ``sections`` override top-level sections."""
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
    return parse_config(data)
