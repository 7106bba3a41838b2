"""Checkpoints: atomic writes, refusing corrupt or mismatched files, resuming the exact trajectory."""

import os

import pytest
import torch

from conftest import tiny_config
from orchestrator import train
from orchestrator.cli.main import main
from orchestrator.run import checkpoint
from orchestrator.run.checkpoint import CheckpointError


def save(path, cfg, params, step=1, faults=0):
    checkpoint.save(path, cfg, learner={"params": params, "optimizer": {}, "step": step, "skipped_steps": 0},
                    faults={"count": faults, "stragglers": 0}, tracker={"run_id": None})


def test_round_trip(tmp_path):
    cfg = tiny_config(tmp_path)
    params = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    path = tmp_path / "c.pt"
    save(path, cfg, params, step=7, faults=2)
    ck = checkpoint.load(path)
    assert ck.step == 7 and ck.faults == {"count": 2, "stragglers": 0} and ck.config == cfg
    assert all(torch.equal(ck.params[k], params[k]) for k in params)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_a_non_finite_theta_is_never_written(tmp_path):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.pt"
    save(path, cfg, {"w": torch.ones(2)}, step=1)
    with pytest.raises(ValueError, match="non-finite"):
        save(path, cfg, {"w": torch.tensor([1.0, float("nan")])}, step=2)
    assert checkpoint.load(path).step == 1


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Checkpoints written before the state owners existed: one flat dict, every algorithm's knobs in the config."""
    cfg = tiny_config(tmp_path)
    old_config = cfg.model_dump(mode="json")
    old_config["task"]["points_per_task"] = 50
    old_config["algorithm"].update({"svm_c": 0.1, "hyper_width": 64})
    import yaml

    path = tmp_path / "v1.pt"
    params = {"w": torch.ones(2)}
    torch.save({"format": "metaray-checkpoint/1", "step": 3, "params": params, "optimizer": {"state": {}},
                "config": yaml.safe_dump(old_config), "state": {"faults": 1, "stragglers": 2, "skipped_steps": 4,
                                                                 "mlflow_run_id": "abc"}}, path)
    ck = checkpoint.load(path)
    assert ck.step == 3 and ck.learner["skipped_steps"] == 4 and ck.tracker == {"run_id": "abc"}
    assert ck.faults == {"count": 1, "stragglers": 2} and ck.config == cfg


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.pt"
    save(path, cfg, {"w": torch.ones(2)}, step=1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save(path, cfg, {"w": torch.zeros(2)}, step=2)
    monkeypatch.undo()
    assert checkpoint.load(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a metaray checkpoint") as refused:
        checkpoint.load(bad)
    assert "weights_only" not in str(refused.value)  # never pass on torch's advice to unpickle code
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a metaray checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing")


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "learner": {"step": 0, "params": Evil()}}, path)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    assert not marker.exists()


def test_resume_continues_the_exact_trajectory(tmp_path):
    whole = train(tiny_config(tmp_path / "a", outer={"steps": 6}), evaluate=False)
    first = tiny_config(tmp_path / "b", outer={"steps": 3})
    train(first, evaluate=False)
    resumed = train(tiny_config(tmp_path / "b", outer={"steps": 6}), resume=True, evaluate=False)
    assert resumed.step == 6
    for k in whole.params:
        assert torch.equal(whole.params[k], resumed.params[k]), k


def test_resume_refuses_a_different_run(tmp_path, capsys):
    train(tiny_config(tmp_path, outer={"steps": 2}), evaluate=False)
    with pytest.raises(CheckpointError, match="algorithm.inner_lr: 0.01 in the checkpoint vs 0.02 now"):
        train(tiny_config(tmp_path, outer={"steps": 4}, algorithm={"name": "maml", "inner_lr": 0.02}),
              resume=True, evaluate=False)
    with pytest.raises(CheckpointError, match=r"model.hidden: \[16, 16\] in the checkpoint vs \[8\] now"):
        train(tiny_config(tmp_path, outer={"steps": 4}, model={"hidden": [8]}), resume=True, evaluate=False)


def test_checkpoint_whose_params_do_not_fit_its_config_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "checkpoint.pt"
    save(path, cfg, {"0.weight": torch.ones(3, 1)})
    assert main(["eval", str(path)]) == 2
    assert "parameters do not match the model" in capsys.readouterr().err


@pytest.mark.parametrize("change", [{"num_workers": 2, "shares": 3}, {"num_workers": 3}])
def test_resume_refuses_another_share_count(tmp_path, change):
    # The share cut decides how the gradient sums are rounded: another cut is another trajectory.
    train(tiny_config(tmp_path, outer={"steps": 2}, workers={"num_workers": 2}), evaluate=False)
    with pytest.raises(CheckpointError, match="workers.shares: 2 in the checkpoint vs 3 now"):
        train(tiny_config(tmp_path, outer={"steps": 4}, workers=change), resume=True, evaluate=False)


def test_resume_takes_other_worker_settings_at_the_same_share_count(tmp_path):
    whole = train(tiny_config(tmp_path / "a", outer={"steps": 4}, workers={"num_workers": 2}), evaluate=False)
    train(tiny_config(tmp_path / "b", outer={"steps": 2}, workers={"num_workers": 2}), evaluate=False)
    resumed = train(tiny_config(tmp_path / "b", outer={"steps": 4}, workers={"num_workers": 3, "shares": 2}),
                    resume=True, evaluate=False)
    assert all(torch.equal(whole.params[k], resumed.params[k]) for k in whole.params)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    cfg = tiny_config(tmp_path, outer={"steps": 2})
    train(cfg, evaluate=False)
    before = (cfg.run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass --resume"):
        train(cfg, evaluate=False)
    assert (cfg.run_dir / "checkpoint.pt").read_bytes() == before


def test_cli_eval_refuses_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"garbage")
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a metaray checkpoint" in err and "weights_only" not in err
