"""The command: a tiny training run and its evaluation end to end, and a hard kill followed by --resume."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from orchestrator.cli.main import main
from orchestrator.run import checkpoint


def write_config(tmp_path, steps, mode="inprocess", name="run"):
    cfg = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "checkpoint_every": 1, "log_every": 10},
        "task": {"k_shot": 5, "query": 5},
        "model": {"hidden": [16, 16]},
        "algorithm": {"name": "maml"},
        "outer": {"meta_batch_size": 8, "steps": steps},
        "workers": {"mode": mode, "num_workers": 2},
        "eval": {"tasks": 30, "steps": [0, 1, 5], "probes": {"half": {"support_x_range": [0, 5]}}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metaray(*args, **kw):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_train_prints_results_and_writes_checkpoint(tmp_path, capfd):
    # In-process: the CLI's main() calls the same train() that tests/test_distributed.py runs on Ray. The command
    # as a process (its exit code, nothing on stderr) is tests/test_tracking.py's default-store test and
    # tests/test_config.py's subprocess test.
    path = write_config(tmp_path, steps=20)
    assert main(["train", str(path)]) == 0
    trained = capfd.readouterr().out
    assert "step 20/20" in trained
    for evaluation in ("test", "half"):
        assert f"maml         {evaluation}" in trained
    ck = checkpoint.load(tmp_path / "runs" / "run")
    assert ck.step == 20
    assert (tmp_path / "runs" / "run" / "eval.json").exists()
    assert main(["eval", str(tmp_path / "runs" / "run"), "--set", "workers.mode=inprocess"]) == 0
    again = capfd.readouterr().out
    # Same held-out tasks, same θ: the same numbers as at the end of training.
    assert [line for line in trained.splitlines() if "(n=30)" in line] == \
           [line for line in again.splitlines() if "(n=30)" in line]


@pytest.mark.slow  # SIGKILL + resume is in CI as tests/test_exactly_once.py's first sequence
def test_hard_kill_then_resume_ends_at_the_same_theta(tmp_path):
    steps = 300  # long enough (seconds) that the kill lands mid-run on a fast machine too
    whole = metaray("train", str(write_config(tmp_path, steps, name="whole")))
    assert whole.returncode == 0, whole.stderr[-2000:]

    path = write_config(tmp_path, steps, name="killed")
    ckpt = tmp_path / "runs" / "killed" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and checkpoint.load(ckpt).step >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = checkpoint.load(ckpt).step
    assert 5 <= stopped_at < steps, "the run finished before it could be killed"

    resumed = metaray("train", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'runs' / 'killed'} at step {stopped_at}" in resumed.stdout
    a = checkpoint.load(tmp_path / "runs" / "whole").params
    b = checkpoint.load(ckpt).params
    assert all(torch.equal(a[k], b[k]) for k in a)


def started(tmp_path, steps, at_step, mode="inprocess", **workers):
    """``metaray train`` in a subprocess, returned once it has printed ``step at_step/``."""
    path = write_config(tmp_path, steps, mode=mode, name="stopped")
    data = yaml.safe_load(path.read_text())
    data["run"].update({"checkpoint_every": 100000, "log_every": 1})
    data["workers"].update(workers)
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            return proc, lines
    proc.wait()
    raise AssertionError(f"the run ended before step {at_step}: {proc.stderr.read()[-2000:]}")


def mlflow_status(name):
    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("metaray-sine").experiment_id],
                                f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"],
                                max_results=1)
    return run.info.status


@pytest.mark.slow  # in-process; SIGTERM on Ray (the default path) is in CI: tests/test_default_path.py
def test_sigterm_checkpoints_at_the_step_boundary_and_marks_the_run_killed(tmp_path):
    proc, lines = started(tmp_path, steps=100000, at_step=3)
    proc.send_signal(signal.SIGTERM)  # what a preempted node, Kubernetes or `ray job stop` sends
    out, err = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 143, err[-2000:]
    step = checkpoint.load(tmp_path / "runs" / "stopped").step
    assert 3 <= step < 100000  # not the last periodic checkpoint (there was none): the interruption
    assert f"interrupted: checkpoint at step {step}" in "".join(lines) and "--resume" in "".join(lines)
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert mlflow_status("stopped") == "KILLED"


@pytest.mark.slow  # SIGTERM at a step boundary stays in CI
def test_ctrl_c_during_evaluation_says_what_is_saved_and_marks_the_run_killed(tmp_path):
    path = write_config(tmp_path, steps=2, name="evaluating")
    data = yaml.safe_load(path.read_text())
    data["eval"] = {"tasks": 100000, "batch_tasks": 100, "steps": [0, 50]}  # long enough to be interrupted
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/2"):
            break
    time.sleep(1.0)  # into the evaluation
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "the checkpoint at step 2 is complete" in out and "metaray eval" in out
    assert "stopped by SIGINT" in err and "Traceback" not in err
    assert mlflow_status("evaluating") == "KILLED"
