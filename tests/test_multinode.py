"""A real multi-node Ray cluster on this machine (head + 2 worker nodes on 127.0.0.x): placement, node loss, growth.

Each test starts its own cluster (``conftest.two_node_cluster``: ``ray.cluster_utils.Cluster``, real raylets; the head has no CPUs, like a
real cluster) and connects to it; the session's embedded Ray is shut down first and comes back for later tests.
"""

import threading
import time

import pytest
import ray
import torch

from conftest import flat, tiny_config, two_node_cluster
from orchestrator.build import build_algorithm
from orchestrator.cli.main import main
from orchestrator.run.central_learner import CentralLearner
from orchestrator.workers.group import LocalGroup
from orchestrator.workers.ray_group import WorkerGroup

pytestmark = pytest.mark.cluster

# Fast node-death detection so a killed raylet is noticed in about a second.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 3}


@pytest.fixture
def cluster():
    with two_node_cluster(_system_config=FAST_HEALTH) as (c, nodes):
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes


def reference(tmp_path, steps, shares):
    cfg = tiny_config(tmp_path / "ref", workers={"mode": "inprocess", "num_workers": 1, "shares": shares})
    learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), LocalGroup(cfg))
    for _ in range(steps):
        learner.meta_step()
    return flat(learner.params)


def test_workers_and_sweep_trials_land_on_both_worker_nodes(cluster, tmp_path):
    """A run's two workers, one per node, equal in-process; then, on the same cluster (one start for both: CI
    time), a Ray Tune sweep's two trials at once, one per node."""
    c, nodes = cluster
    cfg = tiny_config(tmp_path, workers={"mode": "ray", "num_workers": 2, "address": c.address})
    group = WorkerGroup(cfg)
    try:
        placed = set(group.node_ids())
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        for _ in range(5):
            learner.meta_step()
    finally:
        group.close()
    assert placed == {n.node_id for n in nodes}
    assert ray.is_initialized()  # the group did not shut down a cluster it did not start
    ref = reference(tmp_path, 5, shares=2)
    assert float((flat(learner.params) - ref).norm() / ref.norm()) <= 1e-6

    # In-process workers: each trial is one actor of 1 CPU, a node's worth. The trials validate, so they are
    # compared on val/loss (reported with its latest value between validations).
    sweep_cfg = tiny_config(tmp_path / "sweep", outer={"steps": 4},
                            workers={"mode": "inprocess", "num_workers": 1, "learner_num_cpus": 1},
                            eval={"every": 2, "val_tasks": 10},
                            tracking={"plots": False, "log_model": False, "log_checkpoint": False})
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep_cfg.to_yaml())
    assert main(["sweep", str(path), "--grid", "outer.lr=[0.01, 0.02]", "--address", c.address,
                 "--max-concurrent", "2", "--name", "spread", "--experiment", "sweep-spread"]) == 0
    table = (tmp_path / "sweep" / "runs" / "spread" / "sweep_results.md").read_text().splitlines()
    assert "| val/loss |" in table[0] and table[0].rstrip(" |").endswith("node")
    assert {row.rstrip(" |").rsplit("| ", 1)[1] for row in table[2:]} == {"127.0.0.3", "127.0.0.4"}
    assert ray.is_initialized()  # the sweep did not shut down a cluster it did not start


@pytest.mark.slow  # worker loss mid-step is in CI on one node (test_distributed)
def test_losing_a_worker_node_mid_step_changes_nothing(cluster, tmp_path, drill):
    c, nodes = cluster
    # Worker 1 is held up in step 2 while its node dies under it.
    cfg = tiny_config(tmp_path, workers={"mode": "ray", "num_workers": 2, "address": c.address})
    drill(worker=1, step=2, action="sleep", seconds=30)
    group = WorkerGroup(cfg)
    try:
        victim = nodes[[n.node_id for n in nodes].index(ray.get(group.pool.slots[1].actor.node_id.remote()))]
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        for _ in range(2):
            learner.meta_step()
        killer = threading.Timer(1.0, lambda: c.remove_node(victim, allow_graceful=False))
        killer.start()
        started = time.monotonic()
        for _ in range(4):
            metrics = learner.meta_step()
        killer.join()
        elapsed = time.monotonic() - started
    finally:
        group.close()
    assert group.faults.count >= 1 and any("worker 1 died" in e for e in group.faults.events)
    assert metrics["orchestrator/faults"] >= 1
    assert elapsed < 25, "the step waited for the dead node instead of recomputing its share"
    ref = reference(tmp_path, 6, shares=2)
    assert float((flat(learner.params) - ref).norm() / ref.norm()) <= 1e-6


@pytest.mark.slow  # elastic growth; node loss and placement stay in CI
def test_a_node_joining_mid_run_adds_a_worker_at_a_step_boundary(cluster, tmp_path):
    c, _ = cluster
    # No workers.shares: the share count follows max_workers, so the worker that joins has shares to take.
    cfg = tiny_config(tmp_path, workers={"mode": "ray", "num_workers": 2, "max_workers": 3, "address": c.address})
    assert cfg.workers.share_count == 3
    group = WorkerGroup(cfg)
    sizes = []
    try:
        learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
        for _ in range(2):
            learner.meta_step()
            sizes.append(group.size)
        c.add_node(num_cpus=1, node_ip_address="127.0.0.5")
        deadline = time.monotonic() + 120
        while group.size < 3 and time.monotonic() < deadline:
            learner.meta_step()
            sizes.append(group.size)
        steps = learner.step
    finally:
        group.close()
    assert sizes[:2] == [2, 2] and sizes[-1] == 3
    ref = reference(tmp_path, steps, shares=3)
    assert float((flat(learner.params) - ref).norm() / ref.norm()) <= 1e-6


@pytest.mark.slow  # store shipping to nodes that lack the store (a third cluster start)
def test_image_store_missing_on_the_nodes_is_shipped_once_per_node(tmp_path, monkeypatch):
    """Workers run in a Ray working_dir package without the data (as after `ray job submit --working-dir`):
    the store reaches them through the object store, one copy per node."""
    from image_layouts import omniglot_folder

    from tasks.converters.omniglot import convert_omniglot

    folder = omniglot_folder(tmp_path / "src", {"Alpha": 4, "Beta": 4}, drawings=4)
    convert_omniglot([folder], tmp_path / "driver" / "omni.arrow", size=16)
    monkeypatch.chdir(tmp_path / "driver")
    empty = tmp_path / "code"
    empty.mkdir()
    with two_node_cluster() as (c, _):
        ray.init(address=c.address, log_to_driver=False, runtime_env={"working_dir": str(empty)})
        cfg = tiny_config(tmp_path, task={"family": "images", "store": "omni.arrow", "n_way": 2, "k_shot": 1,
                                          "query": 2, "split": {"by": "class", "train": 0.5, "test": 0.5}},
                          model={"backbone": "conv4"}, algorithm={"name": "protonet"},
                          workers={"mode": "ray", "num_workers": 2, "address": c.address})
        group = WorkerGroup(cfg)
        try:
            paths = ray.get([s.actor.store_path.remote() for s in group.pool.slots])
            learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
            learner.meta_step()
        finally:
            group.close()
    assert all(p != "omni.arrow" and "metaray-data" in p for p in paths)
    assert len(set(paths)) == 1  # same content hash, same node-local file name


@pytest.mark.slow  # node placement and node loss stay in CI
def test_per_node_reduction_gathers_one_gradient_per_node_and_changes_nothing(cluster, tmp_path):
    c, _ = cluster
    thetas, gathered = {}, {}
    for reduce in ("flat", "node"):
        cfg = tiny_config(tmp_path / reduce, workers={"mode": "ray", "num_workers": 2, "shares": 4, "reduce": reduce,
                                                      "address": c.address})
        group = WorkerGroup(cfg)
        try:
            learner = CentralLearner(cfg, build_algorithm(cfg).init_params(0), group)
            metrics = [learner.meta_step() for _ in range(4)]
        finally:
            group.close()
        thetas[reduce] = flat(learner.params)
        gathered[reduce] = metrics[-1]["perf/gathered_mb"] * 2**20
    numel = learner.spec.numel
    assert gathered["flat"] == 4 * numel * 4  # one float32 gradient per share
    assert gathered["node"] == 2 * numel * 8  # one float64 partial sum per node
    assert torch.equal(thetas["flat"], thetas["node"])
