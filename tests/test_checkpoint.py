"""Checkpoints: atomic writes, refusing corrupt or mismatched files, resuming the exact trajectory."""

import os

import pytest
import torch

from orchestrator import checkpoint
from orchestrator.checkpoint import CheckpointError
from orchestrator.cli import main
from orchestrator.run import train

from conftest import tiny_config


def test_round_trip(tmp_path):
    cfg = tiny_config(tmp_path)
    params = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    path = tmp_path / "c.pt"
    checkpoint.save(path, step=7, params=params, optimizer={"state": {}, "param_groups": []}, config=cfg,
                    state={"faults": 2})
    ck = checkpoint.load(path)
    assert ck.step == 7 and ck.state == {"faults": 2} and ck.config == cfg
    assert all(torch.equal(ck.params[k], params[k]) for k in params)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.pt"
    checkpoint.save(path, step=1, params={"w": torch.ones(2)}, optimizer={}, config=cfg, state={})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(path, step=2, params={"w": torch.zeros(2)}, optimizer={}, config=cfg, state={})
    monkeypatch.undo()
    assert checkpoint.load(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a metaray checkpoint"):
        checkpoint.load(bad)
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
    torch.save({"format": checkpoint.FORMAT, "step": 0, "params": Evil()}, path)
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
    checkpoint.save(path, step=1, params={"0.weight": torch.ones(3, 1)}, optimizer={}, config=cfg, state={})
    assert main(["eval", str(path)]) == 2
    assert "parameters do not match the model" in capsys.readouterr().err


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
    assert err.count("\n") == 1 and "corrupt or not a metaray checkpoint" in err
