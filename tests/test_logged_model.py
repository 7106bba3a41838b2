"""The logged model is a few-shot learner: an MLflow pyfunc that adapts to one task's support set and predicts its
queries, loaded with MLflow's own loader (in this process, in a new one without orchestrator, and served over HTTP),
and ``metaray predict`` on folders of images. Oracles: the evaluation's own per-task scores on the same episodes,
and the algorithm called directly in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import tiny_config
from image_layouts import omniglot_folder
from learners.inner_loop import adaptation_curves
from learners.inner_update import RATE
from learners.params import ParamSpec
from learners.predictor import Blueprint, Predictor
from mlflow_server import free_port
from orchestrator.build import blueprint, build_algorithm, build_tasks
from orchestrator.cli.main import main
from orchestrator.config import parse_config
from orchestrator.run.evaluation import evaluate_all
from orchestrator.tracking import logged_model
from orchestrator.workers.group import LocalGroup
from tasks.episode import EpisodeIds, Purpose

EPISODES = 50
IMAGE_EPISODES = 20  # (the 50-episode comparison is the sine one, against `metaray eval`)


def eval_episodes(cfg, n=EPISODES):
    """The held-out episodes evaluation scores (the same ids, hence the same tasks)."""
    return build_tasks(cfg.task, "eval").sample(EpisodeIds(cfg.eval.seed, 0, tuple(range(n)), Purpose.EVAL))


def task(batch, i):
    return {"support_x": batch.support_x[i].numpy(), "support_y": batch.support_y[i].numpy(),
            "query_x": batch.query_x[i].numpy()}


def test_predictions_are_the_algorithms_own_adaptation_and_evaluations_k_steps():
    """Meta-SGD-like learned rates (MAML++ LSLR) on sine: the predictor's default is ``adapt`` (its rule, its
    rates), and with steps=k its query loss is the evaluation's "after k steps" for each task."""
    spec = Blueprint({"name": "maml", "inner_steps": 2, "inner_lr": 0.05, "lslr": True}, "mlp", [8, 8], 64, None, None,
                     eval_lr=0.03)
    algorithm = spec.build()
    params = algorithm.init_params(0)
    g = torch.Generator().manual_seed(1)
    params = {k: (0.01 + 0.1 * torch.rand(v.shape, generator=g)) if k.startswith(RATE) else v for k, v in params.items()}
    predictor = Predictor.build(spec, params)
    cfg = tiny_config(Path("."), model={"hidden": [8, 8]})
    batch = eval_episodes(cfg, 4)
    curves = adaptation_curves(algorithm, params, batch, 3, 0.03)
    for i in range(4):
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        own = predictor.predict(sx.numpy(), sy.numpy(), qx.numpy())
        expected = algorithm.predict(algorithm.adapt(params, sx, sy), qx).detach().numpy()
        np.testing.assert_allclose(own, expected, rtol=1e-6, atol=1e-7)
        for k in range(4):
            pred = predictor.predict(sx.numpy(), sy.numpy(), qx.numpy(), steps=k)
            loss = float(((torch.from_numpy(pred) - qy) ** 2).mean())
            assert loss == pytest.approx(float(curves["loss"][i, k]), rel=1e-5), (i, k)
    with pytest.raises(ValueError, match=r"query_x has shape \[3, 2\]; this model takes \[N, 1\]"):
        predictor.predict(sx.numpy(), sy.numpy(), np.zeros((3, 2)))


def test_an_image_model_scores_like_evaluation_and_metaray_predict_classifies_folders(tmp_path, capsys):
    """ProtoNet on an Omniglot-layout store: the saved pyfunc, loaded by MLflow, gets the evaluation's accuracy on
    the same held-out episodes (its own adaptation and after 1 fine-tuning step), with class labels of the
    caller's choosing; `metaray predict` on the source PNGs classifies as the algorithm does on the store's pixels."""
    src = omniglot_folder(tmp_path / "src", {"Alpha": 4, "Beta": 5}, drawings=3)
    from tasks.converters.omniglot import convert_omniglot

    convert_omniglot([src], tmp_path / "omni.arrow", size=16)
    cfg = parse_config({
        "task": {"family": "images", "store": str(tmp_path / "omni.arrow"), "n_way": 3, "k_shot": 1, "query": 2,
                 "split": {"by": "group", "train": ["Alpha"], "test": ["Beta"]}},
        "model": {"backbone": "conv4", "width": 4}, "algorithm": {"name": "protonet", "inner_lr": 0.1},
        "workers": {"mode": "inprocess"}, "eval": {"tasks": IMAGE_EPISODES, "steps": [0, 1]}})
    algorithm = build_algorithm(cfg)
    theta = algorithm.init_params(3)
    flat = ParamSpec.of(theta).flatten(theta).numpy().astype(np.float32)
    results, _ = evaluate_all(cfg, LocalGroup(cfg), flat)
    spec = blueprint(cfg)
    assert spec.image == {"shape": [1, 16, 16], "invert": True, "preprocessing": spec.image["preprocessing"]}
    batch = eval_episodes(cfg, IMAGE_EPISODES)
    logged_model.save(tmp_path / "model", spec, theta, logged_model.example_task(batch, spec))
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert [s.name for s in model.metadata.signature.inputs.inputs] == ["support_x", "support_y", "query_x"]
    relabel = np.array([7, 3, 11])  # any labels: the model answers in the caller's
    for steps, params in ((0, {}), (1, {"adaptation_steps": 1})):
        acc = np.mean([np.mean(model.predict({**task(batch, i), "support_y": relabel[batch.support_y[i].numpy()]},
                                             params=params) == relabel[batch.query_y[i].numpy()])
                       for i in range(IMAGE_EPISODES)])
        assert acc == pytest.approx(results["test"]["acc"][steps].mean, abs=1e-6), steps  # (a float32 mean)

    # metaray predict: support/<class>/*.png (one drawing of three Beta characters), query/*.png (the others).
    chars = ["character01", "character03", "character04"]
    for c in chars:
        drawings = sorted((src / "Beta" / c).glob("*.png"))
        (tmp_path / "support" / c).mkdir(parents=True)
        shutil.copy(drawings[0], tmp_path / "support" / c)
        for d in drawings[1:]:
            (tmp_path / "query").mkdir(exist_ok=True)
            shutil.copy(d, tmp_path / "query" / f"{c}-{d.name}")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "model"), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query")]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    # The oracle: the store's pixels (the converter's), the algorithm called directly.
    from tasks.store import ImageStore

    store = ImageStore.open(tmp_path / "omni.arrow")
    images = {c: torch.from_numpy(store.images(store.class_index(f"Beta/{c}")).astype(np.float32) / 255) for c in chars}
    sx, sy = torch.stack([images[c][0] for c in chars]), torch.arange(3)
    qx = torch.cat([images[c][1:] for c in chars])
    expected = algorithm.predict(algorithm.adapt(theta, sx, sy), qx).argmax(-1)
    names = [f"{c}-{d.name}" for c in chars for d in sorted((src / "Beta" / c).glob("*.png"))[1:]]
    assert {Path(k).name: v for k, v in printed.items()} == {n: chars[int(e)] for n, e in zip(names, expected)}
    # A support set of the wrong number of classes: one line naming it, exit 2.
    shutil.rmtree(tmp_path / "support" / chars[0])
    assert main(["predict", str(tmp_path / "model"), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the support set has 2 classes" in err and "3-way" in err, err


# -- registered models, loaded in a new process and served over HTTP -----------------------------------------

LOAD_IN_A_NEW_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mlflow
    model = mlflow.pyfunc.load_model(sys.argv[1])
    episodes = np.load(sys.argv[2])
    out = {}
    for steps in (-1, 0):
        out[str(steps)] = [model.predict({k: episodes[f"{k}{i}"] for k in ("support_x", "support_y", "query_x")},
                                         params={"adaptation_steps": steps}).tolist()
                           for i in range(int(episodes["n"]))]
    import learners
    out["learners"] = learners.__file__
    out["orchestrator"] = any(m == "orchestrator" or m.startswith("orchestrator.") for m in sys.modules)
    print(json.dumps(out))
""")


def scores_as_in_a_new_process(model_uri: str, run_dir: Path, tmp_path: Path):
    """``metaray eval`` of ``run_dir`` on its 50 held-out episodes, and the query losses of the model ``model_uri``
    on those episodes, loaded with MLflow's own loader in a new process without orchestrator (the model folder
    carries learners/ and tasks/): its own adaptation and no adaptation."""
    assert main(["eval", str(run_dir), "--set", "tracking.enabled=false", "--set", "workers.mode=inprocess",
                 "--set", f"eval.tasks={EPISODES}"]) == 0
    (scores,) = [json.loads(p.read_text()) for p in run_dir.glob("eval-*.json")]
    from orchestrator.config import load_config

    episodes = eval_episodes(load_config(run_dir / "config.yaml"))
    arrays = {f"{k}{i}": getattr(episodes, k)[i].numpy() for k in ("support_x", "support_y", "query_x")
              for i in range(EPISODES)}
    np.savez(tmp_path / "episodes.npz", n=EPISODES, **arrays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_NEW_PROCESS, model_uri, str(tmp_path / "episodes.npz")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["orchestrator"] and "/code/learners/" in out["learners"], out["learners"]
    losses = {steps: float(np.mean([np.mean((np.asarray(p) - episodes.query_y[i].numpy()) ** 2)
                                    for i, p in enumerate(out[steps])])) for steps in ("-1", "0")}
    return scores["test"]["loss"], losses


def test_a_run_named_with_a_dot_registers_its_model_which_a_new_process_scores_like_metaray_eval(
        tmp_path, mlflow_store, capsys):
    """`metaray train --set run.name=lr0.01` (MLflow refuses '.' in a model's name): the model is logged under
    lr0p01, registered, nothing is left undelivered; loaded in a new process it scores what `metaray eval` does."""
    cfg = tiny_config(tmp_path, run={"name": "lr0.01"}, eval={"tasks": EPISODES, "steps": [0, 1], "batch_tasks": 25},
                      tracking={"uri": mlflow_store, "experiment": "dotted", "flush_every_s": 0.2, "log_model": True,
                                "system_metrics": False, "registered_model": "sine-dotted"})
    path = tmp_path / "dotted.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path)]) == 0
    assert "not in MLflow yet" not in capsys.readouterr().out  # not waited on, nothing kept back
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("dotted").experiment_id])
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert run.info.run_name == "lr0.01" and model.name == "lr0p01" and model.source_run_id == run.info.run_id
    (version,) = client.search_model_versions("name = 'sine-dotted'")
    assert version.source == f"models:/{model.model_id}" and not (cfg.run_dir / "tracking").exists()
    evaluated, losses = scores_as_in_a_new_process("models:/sine-dotted/1", cfg.run_dir, tmp_path)
    for steps, k in (("-1", "1"), ("0", "0")):  # its own adaptation is MAML's one inner step
        assert abs(losses[steps] - evaluated[k]["mean"]) <= 1e-5 * evaluated[k]["mean"] < evaluated[k]["ci95"], \
            (steps, evaluated[k])


@pytest.fixture(scope="module")
def float_sweep(tmp_path_factory, mlflow_store):
    """A sweep over a float (trial names with '.') that registers its best trial's model."""
    from orchestrator.workers.ray_session import shutdown

    tmp = tmp_path_factory.mktemp("float-sweep")
    cfg = {"run": {"name": "sine", "dir": str(tmp / "runs"), "checkpoint_every": 4, "log_every": 2},
           "task": {"k_shot": 5, "query": 5}, "model": {"hidden": [16, 16]},
           "algorithm": {"name": "maml", "inner_steps": 1, "inner_lr": 0.01},
           "outer": {"meta_batch_size": 8, "steps": 4, "lr": 0.01},
           "workers": {"mode": "inprocess", "num_workers": 1, "num_cpus": 0.5, "learner_num_cpus": 0.5},
           "eval": {"tasks": EPISODES, "steps": [0, 1], "batch_tasks": 25},
           "tracking": {"plots": False, "log_checkpoint": False, "flush_every_s": 0.2, "system_metrics": False}}
    path = tmp / "sine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # inner_lr 50 diverges at its first step: the trial ends "diverged", the sweep goes on and exits 0.
    code = main(["sweep", str(path), "--grid", "algorithm.inner_lr=[0.01, 0.001, 50]", "--name", "floats",
                 "--experiment", "float-sweep", "--register", "sine-floats"])
    shutdown()  # the sweep's embedded Ray: the next test starts its own
    assert code == 0
    return tmp / "runs" / "floats"


@pytest.mark.slow  # a sweep on Ray Tune (~50 s here); in CI, test_sweep's sweep registers a float-named trial's model
def test_a_float_sweep_logs_every_trials_model_and_registers_the_best_one_that_a_new_process_loads(
        float_sweep, mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("float-sweep")
    parent_id = json.loads((float_sweep / "sweep.json").read_text())["parent_run_id"]
    trials = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                              f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert set(trials) == {"inner_lr-0.01_sine", "inner_lr-0.001_sine", "inner_lr-50_sine"}
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"inner_lr-0p01_sine", "inner_lr-0p001_sine"}  # each trial's model, '.' written p
    diverged = trials["inner_lr-50_sine"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["metaray.sweep.trial"] == "diverged"
    assert diverged.data.tags["metaray.diverged"].startswith("diverged at step 0")
    assert client.get_run(parent_id).data.metrics["sweep/diverged"] == 1
    best = client.get_run(parent_id).data.params["best.run"]
    (version,) = client.search_model_versions("name = 'sine-floats'")
    assert version.source == f"models:/{models[best.replace('.', 'p')].model_id}" and version.run_id == \
        trials[best].info.run_id
    assert not (float_sweep / best / "tracking").exists()  # everything delivered, nothing waited on
    evaluated, losses = scores_as_in_a_new_process("models:/sine-floats/1", float_sweep / best, tmp_path)
    for steps, k in (("-1", "1"), ("0", "0")):
        assert abs(losses[steps] - evaluated[k]["mean"]) <= 1e-5 * evaluated[k]["mean"] < evaluated[k]["ci95"]


@pytest.mark.slow  # `mlflow models serve` takes 15-30 s to start on a busy 2-core machine
def test_mlflow_models_serve_answers_one_task_over_http(float_sweep, mlflow_store, tmp_path):
    from orchestrator.config import load_config

    (version,) = MlflowClient(mlflow_store).search_model_versions("name = 'sine-floats'")
    run_dir = float_sweep / MlflowClient(mlflow_store).get_run(version.run_id).info.run_name
    cfg = load_config(run_dir / "config.yaml")
    episode = task(eval_episodes(cfg, 1), 0)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/sine-floats/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"inputs": {k: v.tolist() for k, v in episode.items()}}).encode()
        answer, deadline = None, time.monotonic() + 240
        while answer is None and time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=10).read())
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(0.5)
        assert answer is not None, "mlflow models serve did not answer"
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    from orchestrator.run import checkpoint

    theta = checkpoint.load(run_dir).params
    algorithm = build_algorithm(cfg)
    sx, sy, qx = (torch.from_numpy(episode[k]) for k in ("support_x", "support_y", "query_x"))
    expected = algorithm.predict(algorithm.adapt(theta, sx, sy), qx).detach().numpy()
    np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
