"""The central learner: its state round-trips, and no step ever leaves θ non-finite."""

from __future__ import annotations

import torch

from conftest import flat, tiny_config
from orchestrator.build import build_algorithm
from orchestrator.run.central_learner import CentralLearner
from orchestrator.workers.group import LocalGroup


def learner(tmp_path, **outer):
    cfg = tiny_config(tmp_path, outer=outer, workers={"mode": "inprocess", "num_workers": 1})
    return CentralLearner(cfg, build_algorithm(cfg).init_params(0), LocalGroup(cfg))


def test_an_update_that_overflows_is_undone_and_counted(tmp_path):
    # A finite gradient times a finite but huge learning rate overflows float32: the step must not be taken.
    # (Weight decay puts 10 θ into the gradient, so some entry of it exceeds 1 whatever the tasks drew.)
    sane = learner(tmp_path, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=10.0)
    sane.meta_step()
    sane.meta_step()  # momentum buffers exist from here on
    state = sane.state_dict()
    huge = learner(tmp_path, optimizer="sgd", lr=3e38, momentum=0.9, weight_decay=10.0)
    huge.load_state_dict(state)
    metrics = huge.meta_step()
    assert metrics["orchestrator/skipped_steps"] == 1 and huge.skipped_steps == 1 and huge.step == 3
    assert torch.equal(flat(huge.params), flat(state["params"]))
    after = huge.state_dict()["optimizer"]["state"]
    assert len(after) == len(huge.params)
    assert all(torch.equal(after[i]["momentum_buffer"], state["optimizer"]["state"][i]["momentum_buffer"])
               for i in after)
    sane.meta_step()
    assert sane.skipped_steps == 0 and not torch.equal(flat(sane.params), flat(state["params"]))


def test_the_first_update_overflowing_leaves_no_optimizer_state(tmp_path):
    huge = learner(tmp_path, optimizer="sgd", lr=3e38, momentum=0.9, weight_decay=10.0)
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


def test_optimizer_state_is_stored_per_parameter_as_torch_lays_it_out(tmp_path):
    # θ is one flat tensor inside the learner; checkpoints keep torch's layout for an optimizer over the named
    # parameters, so a plain torch.optim.Adam loads them and takes the same step, and its state loads back.
    a = learner(tmp_path)
    for _ in range(2):
        a.meta_step()
    state = a.state_dict()
    named = {k: v.clone() for k, v in state["params"].items()}
    plain = torch.optim.Adam(list(named.values()), lr=a.cfg.outer.lr)
    plain.load_state_dict(state["optimizer"])
    assert [tuple(s["exp_avg"].shape) for s in plain.state.values()] == [tuple(v.shape) for v in named.values()]
    grad = torch.linspace(-1, 1, a.spec.numel)
    for v, g in zip(named.values(), a.spec.unflatten(grad).values()):
        v.grad = g.clone()
    plain.step()
    assert a._apply(grad.numpy())
    torch.testing.assert_close(flat(a.params), flat(named), rtol=1e-6, atol=1e-7)
    b = learner(tmp_path)
    b.load_state_dict({**state, "params": named, "optimizer": plain.state_dict()})
    torch.testing.assert_close(flat(b.params), flat(a.params), rtol=1e-6, atol=1e-7)
    assert float(b.optimizer.state[b.flat]["step"]) == 3
