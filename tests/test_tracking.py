"""MLflow tracking against a real MLflow server and SQLite stores, read back through MLflow's own client."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from orchestrator import checkpoint
from orchestrator.cli import main
from orchestrator.metric_writer import MetricWriter
from orchestrator.run import train

from conftest import tiny_config
from mlflow_server import MlflowServer, free_port

PER_STEP = ("meta/loss", "inner/loss_before", "inner/loss_after", "perf/tasks_per_s", "perf/step_s",
            "perf/compute_s", "orchestrator/faults", "orchestrator/dropped_tasks")


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path).start()
    yield srv
    srv.stop()


def tracked(tmp_path, uri, name="tiny", **sections):
    tracking = {"uri": uri, "experiment": "tracking-test", "flush_every_s": 0.2, **sections.pop("tracking", {})}
    run = {"name": name, "dir": str(tmp_path / "runs"), "checkpoint_every": 2, **sections.pop("run", {})}
    return tiny_config(tmp_path, run=run, tracking=tracking, **sections)


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id, path=""):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_two_runs_in_one_experiment_on_a_real_server(tmp_path, server):
    cfgs = [tracked(tmp_path, server.url, name=n, algorithm={"name": a}, outer={"steps": 6},
                    tracking={"plots": True, "log_model": True, "log_checkpoint": True})
            for n, a in (("maml-run", "maml"), ("reptile-run", "reptile"))]
    results = [train(c) for c in cfgs]
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("tracking-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"maml-run", "reptile-run"}
    for cfg, result in zip(cfgs, results):
        run = runs[cfg.run.name]
        assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
        expected = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in cfg.flat().items()}
        assert {k: run.data.params[k] for k in expected} == expected
        assert run.data.params["resources.workers"] == "1"  # in-process: one worker, the learner's
        assert run.data.params["resources.shares"] == "2"
        assert run.data.tags["metaray.algorithm"] == cfg.algorithm.name
        assert run.data.tags["metaray.task_family"] == "sine" and "metaray.version" in run.data.tags
        for key in PER_STEP:
            assert steps_of(client, run.info.run_id, key) == list(range(6)), key
        assert steps_of(client, run.info.run_id, "eval/test/loss_curve") == [0, 1]
        stored = run.data.metrics["eval/test/loss_step1"]
        assert stored == pytest.approx(result.results["test"]["loss"][1].mean)
        files = artifacts(client, run.info.run_id)
        for f in ("config.yaml", "checkpoint/checkpoint.pt", "plots/learning_curves.png",
                  "plots/loss_vs_steps.png", "plots/sine_fits_test.png"):
            assert f in files, (f, files)
    # The model artifact is a real MLflow PyTorch model holding the trained θ.
    from orchestrator.tracking import _fluent_uri

    with _fluent_uri(server.url):
        models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
        maml_model = next(m for m in models if m.source_run_id == results[0].run_id)
        module = mlflow.pytorch.load_model(maml_model.model_uri)
    assert len(models) == 2
    assert os.environ["MLFLOW_TRACKING_URI"] != server.url  # nothing leaked into the process-wide default
    x = torch.linspace(-5, 5, 7)[:, None]
    from orchestrator.build import build_algorithm

    expected = build_algorithm(cfgs[0]).predict(results[0].params, x)
    torch.testing.assert_close(module(x), expected)


def test_server_down_mid_run_loses_and_duplicates_nothing(tmp_path, server):
    steps = 1500
    cfg = tracked(tmp_path, server.url, outer={"steps": steps}, run={"name": "outage", "checkpoint_every": 25})
    ckpt = cfg.run_dir / checkpoint.FILENAME
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("result", train(cfg, evaluate=False)))
    worker.start()
    client = MlflowClient(server.url)

    def logged_steps():
        try:
            exp = client.get_experiment_by_name("tracking-test")
            runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'outage'")
            return len(client.get_metric_history(runs[0].info.run_id, "meta/loss")) if runs else 0
        except Exception:
            return 0

    deadline = time.monotonic() + 120
    while logged_steps() < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()
    down_at = checkpoint.load(ckpt).step
    while worker.is_alive() and checkpoint.load(ckpt).step < down_at + 200:
        time.sleep(0.05)  # training goes on while the server is down
    trained_while_down = checkpoint.load(ckpt).step - down_at
    server.start()
    worker.join(300)
    result = done["result"]
    assert result.step == steps and trained_while_down >= 100
    run_id = result.run_id
    for key in PER_STEP:
        assert steps_of(client, run_id, key) == list(range(steps)), key
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not list(cfg.run_dir.glob("tracking-spill-*.jsonl"))


def test_resume_continues_the_same_run_with_continuous_steps(tmp_path, mlflow_store):
    first = train(tracked(tmp_path, mlflow_store, outer={"steps": 4}))
    resumed = train(tracked(tmp_path, mlflow_store, outer={"steps": 9}), resume=True)
    assert resumed.run_id == first.run_id
    client = MlflowClient(mlflow_store)
    for key in PER_STEP:
        assert steps_of(client, first.run_id, key) == list(range(9)), key
    # The resumed run's evaluation is recorded too (not filtered out as "already logged").
    latest = client.get_run(first.run_id).data.metrics
    assert latest["eval/test/loss_step1"] == pytest.approx(resumed.results["test"]["loss"][1].mean)
    curve = [m for m in client.get_metric_history(first.run_id, "eval/test/loss_curve") if m.step == 1]
    assert any(m.value == pytest.approx(float(resumed.test_curve[0][1])) for m in curve)


def test_resume_after_a_crash_does_not_record_steps_twice(tmp_path, mlflow_store):
    # The first process logged steps 0..5 but its last checkpoint is at step 4 (as after a crash).
    cfg = tracked(tmp_path, mlflow_store, outer={"steps": 6}, run={"name": "crashed", "checkpoint_every": 4})
    first = train(cfg, evaluate=False)
    ck = checkpoint.load(cfg.run_dir)
    at_four = train(tracked(tmp_path / "ref", mlflow_store, outer={"steps": 4}, run={"name": "ref"}), evaluate=False)
    checkpoint.save(ck.path, ck.config, learner=checkpoint.load(at_four.run_dir).learner, faults=ck.faults,
                    tracker=ck.tracker)
    train(tracked(tmp_path, mlflow_store, outer={"steps": 8}, run={"name": "crashed", "checkpoint_every": 4}),
          resume=True, evaluate=False)
    client = MlflowClient(mlflow_store)
    assert steps_of(client, first.run_id, "meta/loss") == list(range(8))


def test_bad_tracking_uri_fails_before_training(tmp_path, capsys):
    port = free_port()  # nothing listens there
    for uri in ("foo://nowhere", f"http://127.0.0.1:{port}"):
        cfg_path = tmp_path / "c.yaml"
        cfg_path.write_text(f"run:\n  dir: {tmp_path / 'runs'}\ntracking:\n  uri: '{uri}'\n"
                            "workers:\n  mode: ray\n")
        assert main(["train", str(cfg_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"tracking store {uri!r} is not usable" in err
        assert not (tmp_path / "runs").exists()


def test_default_store_is_local_sqlite_and_ui_serves_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("outer:\n  steps: 3\n  meta_batch_size: 4\nworkers:\n  mode: inprocess\n"
                        "eval:\n  tasks: 10\n  steps: [0, 1]\ntracking:\n  log_model: false\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(cfg_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metaray-sine")
    (run,) = client.search_runs([exp.experiment_id])
    assert steps_of(client, run.info.run_id, "meta/loss") == [0, 1, 2]

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body, deadline = None, time.monotonic() + 180
        while body is None and time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                             data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(req, timeout=2).read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "metaray ui did not serve"
        assert "metaray-sine" in [e["name"] for e in body["experiments"]]
    finally:
        ui.send_signal(signal.SIGTERM)  # as `kill PID` does: metaray ui stops its server, then exits
        try:
            ui.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ui.pid, signal.SIGKILL)  # (nothing left to kill if it worked)
    assert ui.returncode == 0
    assert f"http://127.0.0.1:{port}" in ui.stdout.read().decode()
    with pytest.raises(OSError):  # the MLflow server went with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).count(f"--port {port}")]
    assert not left, [_cmdline(p) for p in left]


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_writer_buffers_spills_and_recovers_without_loss(tmp_path):
    received: list[Metric] = []
    state = {"up": False}

    def send(batch):
        if not state["up"]:
            raise ConnectionError("server down")
        received.extend(batch)

    spill = tmp_path / "spill.jsonl"
    writer = MetricWriter(send, spill, flush_every_s=0.05, max_buffered=50)
    for step in range(40):
        writer.add({"a": step, "b": -step}, step)
    deadline = time.monotonic() + 10
    while not spill.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spill.exists() and writer.pending == 80  # 50 in memory or in flight, the oldest 30 on disk
    state["up"] = True
    assert writer.close(timeout_s=30) == 0
    got = sorted((m.key, m.step, m.value) for m in received)
    assert got == sorted([("a", s, float(s)) for s in range(40)] + [("b", s, float(-s)) for s in range(40)])
    assert not spill.exists()


def test_writer_keeps_what_it_cannot_send_for_the_next_process(tmp_path):
    spill = tmp_path / "spill.jsonl"

    def down(batch):
        raise ConnectionError("down")

    w = MetricWriter(down, spill, flush_every_s=0.05)
    w.add({"a": 1.0}, 0)
    w.add({"a": 2.0}, 1)
    assert w.close(timeout_s=0.3) == 2
    received = []
    w2 = MetricWriter(received.extend, spill, flush_every_s=0.05)
    assert w2.close(timeout_s=10) == 0
    assert [(m.step, m.value) for m in received] == [(0, 1.0), (1, 2.0)]
    assert np.isfinite([m.timestamp for m in received]).all()


def test_metric_process_flush_hands_off_steps_that_reach_the_store_without_close(tmp_path):
    """Steps are handed to the writer process in batches; ``flush`` (called at every checkpoint) makes the
    steps so far reach the store even if the learner then dies without ``close``."""
    from orchestrator.metric_writer import MetricProcess

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("flush")).info.run_id
    writer = MetricProcess(uri, run_id, tmp_path / "spill.jsonl", flush_every_s=0.1, max_buffered=1000)
    assert writer.wait_ready()
    for step in range(5):
        writer.add({"m": float(step)}, step)
    writer.flush()
    deadline = time.monotonic() + 60
    while len(client.get_metric_history(run_id, "m")) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [m.step for m in client.get_metric_history(run_id, "m")] == list(range(5))
    os.kill(writer.pid, 9)  # nothing left to lose; close() must still come back and say so
    assert writer.close(timeout_s=1) == 0
