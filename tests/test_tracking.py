"""MLflow tracking against a real MLflow server and SQLite stores, read back through MLflow's own client."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from conftest import tiny_config
from mlflow_server import MlflowServer, free_port
from orchestrator import train
from orchestrator.cli.main import main
from orchestrator.run import checkpoint
from orchestrator.tracking import metric_log
from orchestrator.tracking.delivery import Delivery, mlflow_delivery, register
from orchestrator.tracking.metric_log import MetricLog
from orchestrator.tracking.tracker import EXPERIMENT_KIND, MODEL_TRAINING
from orchestrator.tracking.writer import MetricProcess

PER_STEP = ("meta/loss", "inner/loss_before", "inner/loss_after", "perf/tasks_per_s", "perf/step_s",
            "perf/compute_s", "orchestrator/faults", "orchestrator/dropped_tasks")


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture
def server(_module_server):
    """One server for the module (a start costs seconds); a test that stopped it finds it started again."""
    if _module_server.proc is None:
        _module_server.start(timeout_s=300)  # a busy machine starts it slowly
    return _module_server


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


@pytest.mark.slow  # server tracking: the outage test runs on the same server in CI
def test_two_runs_in_one_experiment_on_a_real_server(tmp_path, server):
    cfgs = [tracked(tmp_path, server.url, name=n, algorithm={"name": a}, outer={"steps": 6},
                    tracking={"plots": True, "log_model": True, "log_checkpoint": True, "registered_model": reg})
            for n, a, reg in (("maml-run", "maml", "sine-maml"), ("reptile-run", "reptile", None))]
    results = [train(c) for c in cfgs]
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("tracking-test")
    assert exp.tags[EXPERIMENT_KIND] == MODEL_TRAINING  # the UI opens it for model training, not GenAI
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
        assert run.data.metrics["eval/test/diverged_step1"] == 0
        assert "system/cpu_utilization_percentage" in run.data.metrics  # the System metrics tab has data
        files = artifacts(client, run.info.run_id)
        for f in ("config.yaml", "checkpoint/checkpoint.pt", "plots/learning_curves.png", "plots/loss_vs_steps.png",
                  "plots/eval_curves.png", "plots/sine_fits_test.png", "eval/results.csv"):
            assert f in files, (f, files)
        # The CI sits next to its value: one row per metric and step count.
        table = client.download_artifacts(run.info.run_id, "eval/results.csv", str(tmp_path))
        rows = {(r[0], r[1], r[2]): r for r in (line.split(",") for line in open(table).read().splitlines()[1:])}
        score = result.results["test"]["loss"][1]
        assert float(rows["test", "loss", "1"][3]) == pytest.approx(score.mean, rel=1e-5)
        assert float(rows["test", "loss", "1"][4]) == pytest.approx(score.ci95, rel=1e-5)
        assert not (cfg.run_dir / "tracking").exists()  # everything delivered: nothing kept in the run folder
    # The model is a LoggedModel named after its run, holding the trained θ, with the final evaluation
    # (and no training step) linked; the maml run's is registered.
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"maml-run", "reptile-run"}
    maml_model = models["maml-run"]
    assert maml_model.source_run_id == results[0].run_id and maml_model.status == LoggedModelStatus.READY
    linked = {m.key: m for m in maml_model.metrics}
    assert linked["eval/test/loss_step1"].value == pytest.approx(results[0].results["test"]["loss"][1].mean)
    assert {m.step for m in maml_model.metrics} == {6} and not any(k.startswith("meta/") for k in linked)
    (version,) = client.search_model_versions("name = 'sine-maml'")
    assert version.source == f"models:/{maml_model.model_id}" and version.run_id == results[0].run_id
    assert register(server.url, results[1].run_id, "sine-reptile") == "1"  # after the fact, e.g. from the CLI
    (version,) = client.search_model_versions("name = 'sine-reptile'")
    assert version.source == f"models:/{models['reptile-run'].model_id}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        module = mlflow.pytorch.load_model(maml_model.model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    x = torch.linspace(-5, 5, 7)[:, None]
    from orchestrator.build import build_algorithm

    expected = build_algorithm(cfgs[0]).predict(results[0].params, x)
    torch.testing.assert_close(module(x), expected)


def test_a_password_in_the_tracking_uri_is_used_and_saved_nowhere(tmp_path, server, ray_local, capfd, monkeypatch):
    """http://user:password@host on the default path (Ray, 2 workers) with every artifact: the run is tracked, and
    the password is in no param, tag, artifact, checkpoint, file of the run or of the server, or line of output."""
    secret = "pw-7c1e9f"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # restored (unset) after the test
    uri = server.url.replace("http://", f"http://alice:{secret}@")
    cfg = tracked(tmp_path, uri, name="secret", outer={"steps": 4}, workers={"mode": "ray", "num_workers": 2},
                  tracking={"plots": True, "log_model": True, "log_checkpoint": True})
    result = train(cfg)
    client = MlflowClient(server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"].startswith("http://alice:***@127.0.0.1")
    assert {"config.yaml", "checkpoint/checkpoint.pt"} <= set(artifacts(client, result.run_id))
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string="name = 'secret'")
    seen = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(model.params)]
    seen += list(capfd.readouterr())
    files = [f for root in (tmp_path, server.folder) for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "checkpoint.pt" for f in files) and any(f.suffix == ".db" for f in files)
    leaks = [str(f) for f in files if secret.encode() in f.read_bytes()]
    leaks += [text[max(0, text.find(secret) - 60):][:120] for text in seen if secret in text]
    assert not leaks, leaks
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == secret  # how MLflow's client and the writer got it


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

    def saved_step():
        return checkpoint.load(ckpt).step if ckpt.exists() else -1

    # Down once some steps reached the store; at step 500 even if none did (a loaded machine starves the
    # idle-priority writer), so that training always goes on while the server is down.
    deadline = time.monotonic() + 120
    while logged_steps() < 50 and saved_step() < 500 and time.monotonic() < deadline:
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
    assert not (cfg.run_dir / "tracking").exists()


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


# A process that opens the store once a go-file appears: as MLflow's client does under the lock, or as a tracker
# (the config as JSON). Separate interpreters, so the client variant imports MLflow alone.
OPEN_STORE = """
import json, os, sys, time
uri, go, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if cfg:
    from orchestrator.config import parse_config
    from orchestrator.tracking.tracker import MlflowTracker
    cfg = parse_config(cfg)
else:
    from mlflow import MlflowClient
    from orchestrator.tracking.store import first_touch
while not os.path.exists(go):
    time.sleep(0.005)
if cfg:
    MlflowTracker(cfg).close()
else:
    with first_touch(uri):
        MlflowClient(uri).search_experiments()
"""


@pytest.mark.parametrize("through", [
    "client",
    pytest.param("tracker", marks=pytest.mark.slow),  # 3 processes importing torch; the lock itself stays in CI
])
def test_processes_started_together_on_a_new_sqlite_store_all_open_it(tmp_path, through):
    """Three processes open a store that does not exist yet at the same moment, as two `metaray train` started
    together in a new folder do. MLflow creates and migrates a new store's tables on first connection; without
    the lock beside the store, two of three processes failed here with "duplicate column name: step"."""
    uri, go = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", tmp_path / "go"
    cfgs = [tracked(tmp_path, uri, name=f"r{i}", tracking={"system_metrics": False}).model_dump(mode="json")
            if through == "tracker" else None for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, str(go), json.dumps(cfg)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cfg in cfgs]
    time.sleep(1.0)  # most of the imports done, so that the three open the store together
    go.touch()
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[-600:] for o in outputs]
    if through == "tracker":
        client = MlflowClient(uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "tracking-test"]
        assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["r0", "r1", "r2"]


def test_default_store_is_local_sqlite_and_ui_serves_it(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("outer:\n  steps: 3\n  meta_batch_size: 4\nworkers:\n  mode: inprocess\n"
                        "eval:\n  tasks: 10\n  steps: [0, 1]\ntracking:\n  log_model: false\n")
    # `metaray train` in a folder, no tracking URI set: in-process (the command as a process is
    # tests/test_config.py's subprocess test); the UI below is a real process.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", str(cfg_path)]) == 0
    monkeypatch.undo()
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


def test_metric_log_is_delivered_once_across_failures_crashes_and_processes(tmp_path):
    """The log on disk is the only copy until delivered: a failing store loses nothing, a delivery cut off
    before its cursor moved resends exactly the same entries (which MLflow drops as duplicates), a line cut
    by a crash is skipped, and a second process's lines go to a new segment."""
    folder = tmp_path / "tracking" / "run"
    first = MetricLog(folder)
    for step in range(40):
        first.append(step, 1000 + step, {"a": float(step), "b": -float(step)})
    first.sync()
    with open(metric_log.segments(folder)[0], "ab") as f:
        f.write(b'[40, 1040, {"a": 4')  # the process died in the middle of this line
    second = MetricLog(folder)  # e.g. the resumed run: a segment of its own
    second.append(40, 2040, {"a": 40.0, "b": -40.0})
    second.close()
    assert len(metric_log.segments(folder)) == 2 and metric_log.pending_count(folder) == 82
    assert metric_log.last_steps(folder) == {"a": 40, "b": 40}

    received, calls = [], {"n": 0}

    def send(batch):  # the store: down for the 1st and 3rd request
        calls["n"] += 1
        if calls["n"] in (1, 3):
            raise ConnectionError("store down")
        received.extend(batch)

    def delivery():  # a fresh writer process on the folder; chunks of 30 metrics, one request each
        return Delivery(folder, send, lambda entry: None, chunk=30)

    with pytest.raises(ConnectionError):
        delivery().metrics()
    assert not received and metric_log.pending_count(folder) == 82
    with pytest.raises(ConnectionError):
        delivery().metrics()  # the first chunk is delivered and the cursor moved past it, then the store fails
    assert len(received) == 30 and metric_log.pending_count(folder) == 52
    (folder / "cursor.json").unlink()  # a crash lost the cursor: the next writer starts over
    assert delivery().metrics()
    assert metric_log.pending_count(folder) == 0
    assert [p.name for p in metric_log.segments(folder)] == ["wal-000002.jsonl"]  # delivered segments go
    expected = {(k, sign * float(s), 1000 + s, s) for s in range(40) for k, sign in (("a", 1), ("b", -1))}
    expected |= {("a", 40.0, 2040, 40), ("b", -40.0, 2040, 40)}
    assert len(received) == 30 + 82 and set(received) == expected
    assert received[30:60] == received[:30]  # resent exactly as first sent: MLflow keeps one of each


def test_resent_metrics_are_recorded_once_by_mlflow(tmp_path, mlflow_store):
    """What the log relies on: MLflow drops an exact (key, value, timestamp, step) duplicate."""
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    folder = tmp_path / "run"
    log = MetricLog(folder)
    for step in range(5):
        log.append(step, 1000 + step, {"m": float(step), "n": float("nan")})
    log.close()
    assert mlflow_delivery(folder, client, run_id, "0").metrics()
    (folder / "cursor.json").unlink()  # as after a crash between the send and the cursor
    assert mlflow_delivery(folder, client, run_id, "0").metrics()
    assert steps_of(client, run_id, "m") == list(range(5)) and steps_of(client, run_id, "n") == list(range(5))


def test_a_killed_writer_loses_nothing_and_close_counts_what_is_left(tmp_path, mlflow_store):
    """The writer process is SIGKILLed while the store is down: close() still knows exactly how many metrics
    are undelivered (they are on disk), and the next writer on the folder delivers each once."""
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("Default").experiment_id
    run_id = client.create_run(exp).info.run_id
    folder = tmp_path / "tracking" / run_id
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    writer = MetricProcess(down, run_id, exp, folder, flush_every_s=0.05)
    for step in range(5):
        writer.add({"m": float(step)}, step)
    writer.flush()
    os.kill(writer.pid, 9)
    assert writer.close(timeout_s=0) == 5
    writer = MetricProcess(mlflow_store, run_id, exp, folder, flush_every_s=0.05)
    writer.add({"m": 5.0}, 5)
    assert writer.close(timeout_s=30) == 0
    assert steps_of(client, run_id, "m") == list(range(6))
    assert [m.value for m in sorted(client.get_metric_history(run_id, "m"), key=lambda m: m.step)] == list(range(6))


def test_resuming_a_run_that_was_already_evaluated_records_nothing_twice(tmp_path, mlflow_store):
    """E.g. a sweep trial that completed just as its sweep was interrupted: Tune resumes it, and its checkpoint is
    the final one. Its evaluation and artifacts are not made again; the run ends FINISHED with the same results."""
    first = train(tracked(tmp_path, mlflow_store, outer={"steps": 4}))
    out = io.StringIO()
    again = train(tracked(tmp_path, mlflow_store, outer={"steps": 4}), resume=True, out=out)
    assert "already trained and evaluated at step 4; nothing left to do" in out.getvalue()
    assert again.run_id == first.run_id and again.step == 4
    assert again.results["test"]["loss"][1] == first.results["test"]["loss"][1]
    assert all((a == b).all() for a, b in zip(again.test_curve, first.test_curve))
    client = MlflowClient(mlflow_store)
    for key in ("eval/test/loss_step1", "eval/test/loss_curve"):
        history = client.get_metric_history(first.run_id, key)
        assert len(history) == len({m.step for m in history}), key  # each once
    assert steps_of(client, first.run_id, "meta/loss") == list(range(4))
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # More steps on resume: it trains on and evaluates again, as before.
    more = train(tracked(tmp_path, mlflow_store, outer={"steps": 6}), resume=True)
    assert more.step == 6 and client.get_run(first.run_id).data.metrics["eval/test/loss_step1"] == pytest.approx(
        more.results["test"]["loss"][1].mean)
