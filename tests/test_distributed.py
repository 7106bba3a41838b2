"""Real Ray: distributed == in-process, determinism, surviving dead workers, the worker's own errors."""

import os
import time

import numpy as np
import pytest
import ray
import torch

from conftest import flat, tiny_config
from orchestrator import train
from orchestrator.build import build_algorithm
from orchestrator.run.central_learner import CentralLearner
from orchestrator.run.evaluation import evaluate
from orchestrator.workers.group import LocalGroup
from orchestrator.workers.ray_group import WorkerGroup

pytestmark = pytest.mark.usefixtures("ray_local")


def run_steps(cfg, group, steps, between=None):
    params = build_algorithm(cfg).init_params(cfg.run.seed)
    learner = CentralLearner(cfg, params, group)
    for s in range(steps):
        if between:
            between(s, group)
        learner.meta_step()
    return learner


@pytest.fixture
def cfg_ray(tmp_path):
    return tiny_config(tmp_path, workers={"mode": "ray", "num_workers": 2})


def test_ray_two_workers_equal_in_process_and_are_bit_reproducible(cfg_ray, tmp_path):
    cfg_local = tiny_config(tmp_path, workers={"mode": "inprocess", "num_workers": 1})
    ref = run_steps(cfg_local, LocalGroup(cfg_local), 5)
    runs = []
    for _ in range(2):
        group = WorkerGroup(cfg_ray)
        try:
            runs.append(flat(run_steps(cfg_ray, group, 5).params))
        finally:
            group.close()
    expected = flat(ref.params)
    assert not torch.equal(expected, flat(build_algorithm(cfg_ray).init_params(0)))  # it trained
    rel = float((runs[0] - expected).norm() / expected.norm())
    assert rel <= 1e-6, rel
    assert torch.equal(runs[0], runs[1])  # same seed, same worker count: bit-identical


def test_worker_process_exiting_mid_step_changes_nothing(cfg_ray, tmp_path, drill):
    clean = train(tiny_config(tmp_path / "clean", workers={"mode": "ray", "num_workers": 2}), evaluate=False)
    faulty_cfg = tiny_config(tmp_path / "faulty", workers={"mode": "ray", "num_workers": 2})
    drill(worker=1, step=2, action="exit")
    faulty = train(faulty_cfg, evaluate=False)
    assert clean.faults == 0
    assert faulty.faults >= 1 and any("worker 1 died" in e for e in faulty.fault_events)
    assert torch.equal(flat(clean.params), flat(faulty.params))
    # The count survives in the checkpoint (the run's output).
    from orchestrator.run import checkpoint

    assert checkpoint.load(faulty_cfg.run_dir).faults["count"] >= 1


@pytest.mark.slow  # worker loss mid-step stays in CI
def test_ray_kill_between_steps_is_detected_and_changes_nothing(cfg_ray):
    group = WorkerGroup(cfg_ray)
    try:
        def kill(step, g):
            if step == 2:
                ray.kill(g.pool.slots[0].actor, no_restart=False)  # restarts (max_restarts=-1) and rebuilds from config

        killed = run_steps(cfg_ray, group, 5, kill)
        faults = group.faults.count
    finally:
        group.close()
    group = WorkerGroup(cfg_ray)
    try:
        clean = run_steps(cfg_ray, group, 5)
    finally:
        group.close()
    assert faults >= 1
    assert torch.equal(flat(killed.params), flat(clean.params))


@pytest.mark.slow  # one Ray round trip of an error
def test_worker_errors_are_reraised_as_themselves(cfg_ray):
    group = WorkerGroup(cfg_ray)
    try:
        theta = np.zeros(3, dtype=np.float32)  # wrong size for the model
        from tasks.episode import EpisodeIds

        with pytest.raises(ValueError, match="flat vector has 3 values"):
            group.meta_gradient(theta, [EpisodeIds(0, 0, (0, 1))])
    finally:
        group.close()


@pytest.mark.slow  # training's Ray == in-process stays in CI
def test_evaluation_on_ray_equals_in_process(cfg_ray, tmp_path):
    params = build_algorithm(cfg_ray).init_params(0)
    theta = flat(params).numpy()
    local = evaluate(cfg_ray, LocalGroup(cfg_ray), theta)
    group = WorkerGroup(cfg_ray)
    try:
        remote = evaluate(cfg_ray, group, theta)
    finally:
        group.close()
    assert local["loss"].shape == (20, 2)
    np.testing.assert_allclose(remote["loss"], local["loss"], rtol=1e-6)


@pytest.mark.slow  # non-finite tasks: in-process tests in CI
def test_diverging_inner_loops_never_reach_theta(tmp_path):
    # A huge inner step size makes every inner loop overflow to inf/NaN in float32.
    cfg = tiny_config(tmp_path, algorithm={"name": "maml", "inner_lr": 1e6, "inner_steps": 4},
                      workers={"mode": "ray", "num_workers": 2})
    result = train(cfg, evaluate=False)
    init = build_algorithm(cfg).init_params(0)
    dropped = result.history["orchestrator/dropped_tasks"]
    assert len(dropped) == 5 and all(d > 0 for d in dropped)
    assert torch.isfinite(flat(result.params)).all()
    assert result.skipped_steps == sum(d == 8 for d in dropped)
    if result.skipped_steps == len(dropped):
        assert torch.equal(flat(result.params), flat(init))


@pytest.mark.slow  # a 6 s drill; worker exit and kill stay in CI
def test_straggler_is_overtaken_after_the_deadline_and_changes_nothing(tmp_path, drill):
    clean = train(tiny_config(tmp_path / "clean", workers={"mode": "ray", "num_workers": 2}), evaluate=False)
    slow_cfg = tiny_config(tmp_path / "slow", workers={"mode": "ray", "num_workers": 2, "straggler_deadline_s": 0.5})
    drill(worker=1, step=2, action="sleep", seconds=60)
    started = time.monotonic()
    slow = train(slow_cfg, evaluate=False)
    elapsed = time.monotonic() - started
    assert elapsed < 45, "the run waited for the straggler instead of overtaking it"
    assert slow.history["orchestrator/stragglers"][-1] >= 1
    assert torch.equal(flat(clean.params), flat(slow.params))


@pytest.mark.slow  # a second Ray driver; the learner's state is covered in-process
def test_learner_as_its_own_actor_gives_the_same_theta(tmp_path):
    driver = train(tiny_config(tmp_path / "driver", workers={"mode": "ray", "num_workers": 2}), evaluate=False)
    # The session's Ray has 2 CPUs: half a CPU each for two workers and the learner.
    actor = train(tiny_config(tmp_path / "actor", workers={"mode": "ray", "num_workers": 2, "num_cpus": 0.5,
                                                           "learner": "actor", "learner_num_cpus": 0.5}),
                  evaluate=False)
    assert torch.equal(flat(driver.params), flat(actor.params))
    assert (tmp_path / "actor" / "runs" / "tiny" / "checkpoint.pt").exists()
    assert driver.learner_pid == os.getpid() and actor.learner_pid != os.getpid()  # it really ran in an actor
