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
import yaml
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
        expected = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in cfg.params().items()}
        assert {k: run.data.params[k] for k in expected} == expected
        assert run.data.tags["metaray.resources.workers"] == "1"  # in-process: one worker, the learner's
        assert run.data.tags["metaray.workers"] == "inprocess, 2 workers, 2 shares"
        assert run.data.tags["metaray.algorithm"] == cfg.algorithm.name
        assert run.data.tags["metaray.task_family"] == "sine" and "metaray.version" in run.data.tags
        for key in PER_STEP:
            assert steps_of(client, run.info.run_id, key) == list(range(6)), key
        assert steps_of(client, run.info.run_id, "eval/test/loss_curve") == [0, 1]
        stored = run.data.metrics["eval/test/loss_step1"]
        assert stored == pytest.approx(result.results["test"]["loss"][1].mean)
        assert "eval/test/diverged_step1" not in run.data.metrics  # none diverged (test_report: some did)
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
    # (at step 0, as in the run, and no training step) linked; the maml run's is registered.
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"maml-run", "reptile-run"}
    maml_model = models["maml-run"]
    assert maml_model.source_run_id == results[0].run_id and maml_model.status == LoggedModelStatus.READY
    linked = {m.key: m for m in maml_model.metrics}
    assert linked["eval/test/loss_step1"].value == pytest.approx(results[0].results["test"]["loss"][1].mean)
    assert {m.step for m in maml_model.metrics} == {0} and not any(k.startswith("meta/") for k in linked)
    (version,) = client.search_model_versions("name = 'sine-maml'")
    assert version.source == f"models:/{maml_model.model_id}" and version.run_id == results[0].run_id
    assert register(server.url, results[1].run_id, "sine-reptile") == "1"  # after the fact, e.g. from the CLI
    (version,) = client.search_model_versions("name = 'sine-reptile'")
    assert version.source == f"models:/{models['reptile-run'].model_id}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        model = mlflow.pyfunc.load_model(maml_model.model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    # It adapts to a task's support set (MAML's inner step) and predicts its queries.
    sx, sy, x = torch.linspace(-5, 5, 5)[:, None], torch.linspace(-1, 1, 5)[:, None], torch.linspace(-5, 5, 7)[:, None]
    from orchestrator.build import build_algorithm

    algorithm = build_algorithm(cfgs[0])
    expected = algorithm.predict(algorithm.adapt(results[0].params, sx, sy), x).detach()
    got = model.predict({"support_x": sx.numpy(), "support_y": sy.numpy(), "query_x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected)


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
    assert run.info.status == "FINISHED"
    assert {"config.yaml", "checkpoint/checkpoint.pt"} <= set(artifacts(client, result.run_id))
    logged = yaml.safe_load(open(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))))
    assert logged["tracking"]["uri"].startswith("http://alice:***@127.0.0.1")  # said to be there, not said what
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
    printed = ui.stdout.read().decode()
    # The link opens the experiment's runs in MLflow's model-training view (the UI's default is its GenAI view).
    assert f"runs of metaray-sine: http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?" \
           "workflowType=machine_learning" in printed, printed
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


# -- what a researcher reads in MLflow --------------------------------------------------------------------------

def test_a_run_logs_the_params_it_is_compared_by_and_its_evaluation_as_results(tmp_path, mlflow_store):
    """FOMAML on the MLP, with Adam: params say first_order true (its effective value), carry no Conv-4 or SGD key
    and no plumbing (in config.yaml and tags instead), show floats rounded; the evaluation's results are at step 0
    (one bar per run in MLflow's charts), the adaptation curve at its adaptation steps."""
    cfg = tracked(tmp_path, mlflow_store, name="params", algorithm={"name": "fomaml"},
                  outer={"lr": 0.0012345678901}, tracking={"system_metrics": False})
    result = train(cfg)
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    params = run.data.params
    assert params["algorithm.first_order"] == "true" and params["algorithm.name"] == "fomaml"
    assert params["model.hidden"] == "[16, 16]" and "model.width" not in params  # width is Conv-4's
    assert params["outer.optimizer"] == "adam" and not {"outer.momentum", "outer.nesterov"} & set(params)
    assert params["outer.lr"] == "0.00123457" and params["eval.inner_lr"] == "0.01"  # rounded; effective
    assert not [k for k in params if k.startswith(("tracking.", "workers.", "run.dir"))]
    assert run.data.tags["metaray.workers"] == "inprocess, 2 workers, 2 shares"
    assert run.data.tags["metaray.resources.workers"] == "1"
    saved = yaml.safe_load(open(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))))
    assert saved["outer"]["lr"] == 0.0012345678901 and saved["tracking"]["uri"] == mlflow_store  # the exact config
    assert steps_of(client, result.run_id, "eval/test/loss_step1") == [0]  # a result, not a point at step 5
    assert steps_of(client, result.run_id, "eval/test/loss_step1_ci95") == [0]
    assert steps_of(client, result.run_id, "eval/test/loss_curve") == [0, 1]
    assert steps_of(client, result.run_id, "meta/loss") == list(range(5))


def test_a_diverged_run_stops_tagged_and_failed_without_logging_the_blow_up(tmp_path, mlflow_store, capsys):
    """inner_lr 50: the first meta-step's query loss after adaptation is ~1e10 times the loss before it. The run
    stops there (exit 1, one line saying why), its MLflow run is FAILED and tagged metaray.diverged, and none of
    its blown-up values reach the store (nor an evaluation, nor a model)."""
    cfg = tracked(tmp_path, mlflow_store, name="diverges", algorithm={"inner_lr": 50.0},
                  tracking={"system_metrics": False, "log_model": True, "plots": True})
    path = tmp_path / "diverges.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metaray: failed: diverged at step 0: meta/loss" in err, err
    assert "lower algorithm.inner_lr" in err
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id],
                                "attributes.run_name = 'diverges'")
    assert run.info.status == "FAILED"
    assert run.data.tags["metaray.diverged"].startswith("diverged at step 0: meta/loss")
    assert not [k for k in run.data.metrics if not k.startswith("system/")]  # nothing of the blown-up step
    assert not client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}'"))
    assert checkpoint.load(cfg.run_dir).step == 1 and not (cfg.run_dir / "eval.json").exists()


def test_the_comparison_with_other_runs_leaves_diverged_ones_out():
    import numpy as np

    from orchestrator.run.evaluation import comparable

    own = np.array([4.0, 1.0, 0.5])
    kept, left_out = comparable(own, {"fine": [4.1, 2.0, 1.0], "blown": [4.0, 5e5, 1e9], "nan": [4.0, float("nan")]})
    assert list(kept) == ["fine"] and left_out == 2


def test_figure_titles_fit_their_figures():
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from orchestrator.tracking import plots

    history = {"inner/loss_before": list(np.linspace(4, 2, 300)), "inner/loss_after": list(np.linspace(3, 1, 300))}
    curve = {f"run-with-a-rather-long-name-{i}": (np.array([4.0, 2.0, 1.0]), None) for i in range(3)}
    for fig in (plots.learning_curves(history, 0),
                plots.adaptation_plot(curve, "sine: held-out query loss (12 diverged runs left out)")):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer, bounds = canvas.get_renderer(), fig.bbox
        titles = [t for t in [fig._suptitle, *(ax.title for ax in fig.axes)] if t is not None and t.get_text()]
        assert titles
        for t in titles:
            box = t.get_window_extent(renderer)
            assert bounds.x0 <= box.x0 and box.x1 <= bounds.x1 and box.y1 <= bounds.y1, (t.get_text(), box, bounds)


def test_ui_on_a_port_in_use_says_so_in_one_line(tmp_path, mlflow_store, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port), "--uri", mlflow_store]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err and f"--port {port + 1}" in err


def test_what_the_store_refuses_is_set_aside_and_the_rest_delivered(tmp_path, mlflow_store, caplog):
    """A request MLflow refuses (INVALID_PARAMETER_VALUE: a model name with '.', a metric key with '..') would
    be refused again forever: it is set aside with MLflow's message on one line, and delivery goes on at once."""
    from orchestrator.tracking.artifact_queue import ArtifactQueue
    from orchestrator.tracking.delivery import finish, refused_folder

    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("Default").experiment_id
    run_id = client.create_run(exp).info.run_id
    folder = tmp_path / "tracking" / run_id
    log = MetricLog(folder)
    log.append(0, 1000, {"good": 1.0, "bad/../key": 2.0})
    log.append(1, 1001, {"good": 3.0})
    log.close()
    queue = ArtifactQueue(folder / "outbox")
    queue.put_model(lambda target: target.mkdir(), name="lr0.01", step=1, params={}, metrics=[], register=None)
    (tmp_path / "note.txt").write_text("kept")
    queue.put_file(tmp_path / "note.txt")
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="metaray"):
        assert finish(mlflow_delivery(folder, client, run_id, exp), timeout_s=60) is None
    assert time.monotonic() - started < 30  # not retried until the timeout
    assert steps_of(client, run_id, "good") == [0, 1] and "note.txt" in artifacts(client, run_id)
    kept = refused_folder(folder)
    (entry,) = [p for p in kept.iterdir() if p.is_dir()]
    assert "INVALID_PARAMETER_VALUE" in (entry / "refused.txt").read_text()
    assert json.loads((kept / "metrics.jsonl").read_text().splitlines()[0])[:4] == ["bad/../key", 2.0, 1000, 0]
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings), warnings
    assert any("the model 'lr0.01'" in w and "Invalid model name" in w for w in warnings), warnings
