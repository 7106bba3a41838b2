"""Outer LR schedules against torch's own schedulers, resuming mid-schedule, validation and model selection."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from conftest import flat, tiny_config
from orchestrator import train
from orchestrator.config import ConfigError, parse_config
from orchestrator.run import checkpoint
from orchestrator.run.selection import BEST, ModelSelection


def torch_rates(scheduler_cls, steps, **kw):
    """The rates torch.optim.lr_scheduler gives meta-steps 0..steps-1: an independent implementation."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = scheduler_cls(opt, **kw)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("schedule, oracle", [
    ({"kind": "constant"}, lambda n: [0.1] * n),
    ({"kind": "step", "milestones": [3, 7], "gamma": 0.2},
     lambda n: torch_rates(torch.optim.lr_scheduler.MultiStepLR, n, milestones=[3, 7], gamma=0.2)),
    ({"kind": "step", "milestones": [2, 5, 9], "factors": [0.06, 0.012, 0.0024]},  # MetaOptNet's, by epoch
     lambda n: torch_rates(torch.optim.lr_scheduler.LambdaLR, n,
                           lr_lambda=lambda s: 1.0 if s < 2 else 0.06 if s < 5 else 0.012 if s < 9 else 0.0024)),
    ({"kind": "exponential", "every": 4, "gamma": 0.5},
     lambda n: torch_rates(torch.optim.lr_scheduler.StepLR, n, step_size=4, gamma=0.5)),
    ({"kind": "cosine", "min_lr": 0.01},
     lambda n: torch_rates(torch.optim.lr_scheduler.CosineAnnealingLR, n, T_max=n, eta_min=0.01)),
    ({"kind": "cosine", "warmup_steps": 4, "total_steps": 12},
     lambda n: [0.1 * (s + 1) / 4 for s in range(4)] +
               [0.05 * (1 + math.cos(math.pi * (s - 4) / 8)) for s in range(4, n)]),
])
def test_each_schedule_gives_its_closed_form_rates(schedule, oracle):
    outer = parse_config({"outer": {"lr": 0.1, "steps": 12, "schedule": schedule}}).outer
    assert [outer.lr_at(s) for s in range(12)] == pytest.approx(oracle(12), rel=1e-12)


def test_bad_schedules_are_named():
    with pytest.raises(ConfigError, match="outer.schedule.kind: must be one of constant, step"):
        parse_config({"outer": {"schedule": {"kind": "linear"}}})
    with pytest.raises(ConfigError, match="milestones must increase"):
        parse_config({"outer": {"schedule": {"kind": "step", "milestones": [5, 2]}}})
    with pytest.raises(ConfigError, match="factors needs one value per milestone"):
        parse_config({"outer": {"schedule": {"kind": "step", "milestones": [5], "factors": [0.1, 0.01]}}})


def test_the_learner_steps_with_the_scheduled_rate_and_logs_it(tmp_path):
    cfg = tiny_config(tmp_path, tracking={"enabled": True}, outer={"steps": 6, "optimizer": "sgd", "lr": 0.05,
                                       "schedule": {"kind": "step", "milestones": [2, 4], "gamma": 0.5}})
    result = train(cfg, evaluate=False)
    client = MlflowClient()
    logged = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "outer/lr"))
    assert logged == [(s, 0.05 * 0.5 ** ((s >= 2) + (s >= 4))) for s in range(6)]


def test_resuming_in_the_middle_of_a_schedule_is_bit_identical(tmp_path):
    schedule = {"kind": "cosine", "warmup_steps": 2, "min_lr": 1e-5}
    whole = train(tiny_config(tmp_path / "a", outer={"steps": 7, "schedule": schedule}), evaluate=False)
    first = tiny_config(tmp_path / "b", outer={"steps": 3, "schedule": {**schedule, "total_steps": 7}})
    train(first, evaluate=False)
    resumed = train(tiny_config(tmp_path / "b", outer={"steps": 7, "schedule": {**schedule, "total_steps": 7}}),
                    resume=True, evaluate=False)
    assert torch.equal(flat(whole.params), flat(resumed.params))


def test_a_cosine_schedule_that_would_move_on_resume_is_refused(tmp_path):
    train(tiny_config(tmp_path, outer={"steps": 2, "schedule": {"kind": "cosine"}}), evaluate=False)
    with pytest.raises(checkpoint.CheckpointError, match="outer.schedule.total_steps: 2"):
        train(tiny_config(tmp_path, outer={"steps": 4, "schedule": {"kind": "cosine"}}), resume=True, evaluate=False)


def test_the_best_checkpoint_is_the_argmin_of_the_logged_validation_loss(tmp_path):
    cfg = tiny_config(tmp_path, outer={"steps": 12, "lr": 0.02}, eval={"every": 2, "val_tasks": 16},
                      tracking={"enabled": True})
    result = train(cfg)
    history = MlflowClient().get_metric_history(result.run_id, "val/loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
    best = min(history, key=lambda m: (m.value, m.step))
    saved = checkpoint.load(cfg.run_dir / BEST)
    assert saved.step == best.step == result.tested_step
    assert saved.selection["best_value"] == pytest.approx(best.value)
    # The reported test score is the best checkpoint's, not the last θ's (unless they are the same step).
    assert (result.tested_step == 12) == torch.equal(flat(saved.params), flat(result.params))


def test_patience_stops_training_when_validation_stops_improving(tmp_path):
    # A learning rate so small that float32 θ never moves: the validation loss can never improve again.
    cfg = tiny_config(tmp_path, outer={"steps": 40, "optimizer": "sgd", "lr": 1e-30},
                      eval={"every": 2, "val_tasks": 8, "patience": 2})
    result = train(cfg, evaluate=False)
    assert result.step == 6 and result.tested_step == 2  # validations at 2 (best), 4 and 6 (no better): stop


def test_model_selection_state_round_trips_and_prefers_the_right_direction():
    acc = ModelSelection("acc", patience=2)
    assert acc.update(1, {"val/acc": 0.5}) and not acc.update(2, {"val/acc": 0.4})
    assert not acc.update(3, {"val/acc": float("nan")}) and acc.exhausted
    again = ModelSelection("acc", patience=2)
    again.load_state_dict(acc.state_dict())
    assert (again.best_step, again.best_value, again.exhausted) == (1, 0.5, True)
    loss = ModelSelection("loss", patience=None)
    assert loss.update(1, {"val/loss": 2.0}) and loss.update(2, {"val/loss": 1.0}) and not loss.exhausted
