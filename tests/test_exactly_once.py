"""Crashes against a real MLflow store: the driver SIGKILLed (a real `metaray train` process), the tracking
server killed and restarted. After each, no process of the run is left, and every metric step is in MLflow
exactly once; artifacts made while the store was down arrive once it is back."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from conftest import tiny_config
from mlflow_server import MlflowServer
from orchestrator import train
from orchestrator.cli.main import main
from orchestrator.run import checkpoint
from orchestrator.run import recipe as run
from orchestrator.tracking import metric_log

STEPS = 600
PER_STEP = ("meta/loss", "inner/loss_before", "inner/loss_after", "perf/step_s", "orchestrator/faults")


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path).start(timeout_s=300)  # a busy machine starts it slowly
    yield srv
    srv.stop()


def write_config(tmp_path, uri: str, name: str, **tracking) -> str:
    cfg = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "checkpoint_every": 50, "log_every": 10_000},
        "task": {"k_shot": 5, "query": 5},
        "model": {"hidden": [16, 16]},
        "algorithm": {"name": "maml", "inner_steps": 1, "inner_lr": 0.01},
        "outer": {"meta_batch_size": 4, "steps": STEPS},
        "workers": {"mode": "inprocess", "num_workers": 1},
        "eval": {"tasks": 10, "steps": [0, 1], "batch_tasks": 10},
        "tracking": {"uri": uri, "experiment": "exactly-once", "plots": False, "log_model": False,
                     "log_checkpoint": False, "system_metrics": False, **tracking},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_training(tmp_path, config: str) -> subprocess.Popen:
    log = open(tmp_path / "train.log", "ab")
    # One torch thread: the run's writer process must not be the only thing left without a core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", config], stdout=log, stderr=log,
                            env=env)


def resume(tmp_path, config: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", config, "--resume"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]


def wait_for_checkpoint(tmp_path, proc: subprocess.Popen, ckpt, step: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-2000:]
        if ckpt.exists() and checkpoint.load(ckpt).step >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step {step}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs (Ray's agents and workers under the raylet), and so on."""
    parent = {}
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/stat") as f:
                    parent[int(proc)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver; its writer process, and Ray's processes on the default path, must be gone within 30 s."""
    kids = descendants(proc.pid)
    assert kids, "the run should have started its metric writer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30  # an orphaned writer may finish a send in flight first
    while alive(kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(kids), f"processes left by the killed driver: {[(p, cmdline(p)) for p in alive(kids)]}"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def assert_each_step_once(uri: str, name: str) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exactly-once")
    (found,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert found.info.status == "FINISHED"
    for key in PER_STEP:
        steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, key))
        assert steps == list(range(STEPS)), (key, len(steps), len(set(steps)))


def test_driver_killed_leaves_no_process_and_resume_records_each_step_once(tmp_path, mlflow_store):
    """On the default path (Ray, 2 workers): kill mid-run with metrics sent only every 20 s (so none reached the
    store yet), resume at once. No process of the killed run (its writer, Ray's workers and agents) lives 30 s on,
    and no orphaned writer sends anything after the resumed run read the store."""
    config = write_config(tmp_path, mlflow_store, "killed", flush_every_s=20)
    data = yaml.safe_load(open(config))
    data["workers"] = {"mode": "ray", "num_workers": 2}
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    ckpt = tmp_path / "runs" / "killed" / checkpoint.FILENAME
    proc = start_training(tmp_path, config)
    wait_for_checkpoint(tmp_path, proc, ckpt, STEPS // 2)
    kill_driver(proc)
    (folder,) = (tmp_path / "runs" / "killed" / "tracking").iterdir()
    assert metric_log.pending_count(folder) > 0  # the kill did leave metrics only on disk
    resume(tmp_path, config)
    assert_each_step_once(mlflow_store, "killed")
    assert not (tmp_path / "runs" / "killed" / "tracking").exists()


@pytest.mark.slow  # the outage alone is in CI (test_tracking), the SIGKILL alone too
def test_driver_killed_during_a_store_outage_then_resumed_records_each_step_once(tmp_path, server):
    config = write_config(tmp_path, server.url, "outage", flush_every_s=0.2)
    ckpt = tmp_path / "runs" / "outage" / checkpoint.FILENAME
    proc = start_training(tmp_path, config)
    wait_for_checkpoint(tmp_path, proc, ckpt, 100)
    server.stop()
    wait_for_checkpoint(tmp_path, proc, ckpt, STEPS // 2)  # training goes on while the store is down
    kill_driver(proc)
    server.start(timeout_s=300)
    resume(tmp_path, config)
    assert_each_step_once(server.url, "outage")


@pytest.mark.slow  # artifacts kept through an outage (metrics through one are in CI)
def test_artifacts_made_during_an_outage_are_delivered_when_the_store_is_back(tmp_path, server, monkeypatch):
    cfg = tiny_config(tmp_path, run={"name": "late"}, outer={"steps": 4},
                      tracking={"uri": server.url, "experiment": "exactly-once", "plots": True, "log_model": True,
                                "log_checkpoint": True, "close_timeout_s": 0})
    evaluate = run.evaluate_and_report

    def outage_then_evaluate(*args, **kwargs):  # the server dies after training, before the artifacts
        server.stop()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_and_report", outage_then_evaluate)
    out = io.StringIO()
    result = train(cfg, out=out)
    (line,) = [x for x in out.getvalue().splitlines() if x.startswith("tracking: not in MLflow yet")]
    assert "artifacts" in line and "the run's status (FINISHED)" in line
    assert line.endswith(f"deliver with: metaray deliver {cfg.run_dir}")
    server.start(timeout_s=300)
    client = MlflowClient(server.url)
    assert client.get_run(result.run_id).info.status == "RUNNING"
    assert main(["deliver", str(cfg.run_dir)]) == 0
    got = client.get_run(result.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["eval/test/loss_step1"] == pytest.approx(result.results["test"]["loss"][1].mean)
    files = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/loss_vs_steps.png", "plots/sine_fits_test.png"} <= files
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    (model,) = client.search_logged_models([got.info.experiment_id])
    assert model.name == "late" and model.source_run_id == result.run_id
    assert {m.key for m in model.metrics} >= {"eval/test/loss_step1", "eval/test/loss_step1_ci95"}
    assert not (cfg.run_dir / "tracking").exists()
    assert main(["deliver", str(cfg.run_dir)]) == 0  # nothing left: a second delivery does nothing
