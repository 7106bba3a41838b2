"""The central learner: its state round-trips, and no step ever leaves θ non-finite."""

from __future__ import annotations

import torch

from orchestrator.build import build_algorithm
from orchestrator.group import LocalGroup
from orchestrator.learner import CentralLearner

from conftest import flat, tiny_config


def learner(tmp_path, **outer):
    cfg = tiny_config(tmp_path, outer=outer, workers={"mode": "inprocess", "num_workers": 1})
    return CentralLearner(cfg, build_algorithm(cfg).init_params(0), LocalGroup(cfg))


def test_an_update_that_overflows_is_undone_and_counted(tmp_path):
    # A finite gradient times a finite but huge learning rate overflows float32: the step must not be taken.
    sane = learner(tmp_path, optimizer="sgd", lr=0.01, momentum=0.9)
    sane.meta_step()
    sane.meta_step()  # momentum buffers exist from here on
    state = sane.state_dict()
    huge = learner(tmp_path, optimizer="sgd", lr=3e38, momentum=0.9)
    huge.load_state_dict(state)
    metrics = huge.meta_step()
    assert metrics["orchestrator/skipped_steps"] == 1 and huge.skipped_steps == 1 and huge.step == 3
    assert torch.equal(flat(huge.params), flat(state["params"]))
    after = huge.optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], state["optimizer"]["state"][i]["momentum_buffer"])
               for i in after)
    sane.meta_step()
    assert sane.skipped_steps == 0 and not torch.equal(flat(sane.params), flat(state["params"]))


def test_the_first_update_overflowing_leaves_no_optimizer_state(tmp_path):
    huge = learner(tmp_path, optimizer="sgd", lr=3e38, momentum=0.9)
    before = flat(huge.params).clone()
    huge.meta_step()
    assert huge.skipped_steps == 1 and torch.equal(flat(huge.params), before) and not huge.optimizer.state


def test_state_dict_round_trip_continues_identically(tmp_path):
    a = learner(tmp_path)
    for _ in range(2):
        a.meta_step()
    b = learner(tmp_path)
    b.load_state_dict(a.state_dict())
    a.meta_step()
    b.meta_step()
    assert torch.equal(flat(a.params), flat(b.params)) and a.step == b.step == 3
