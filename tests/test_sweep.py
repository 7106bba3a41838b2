"""Sweeps on real Ray Tune: search specs, trial names, placement groups, ASHA, a crash, interruption and
--resume, the sweep's MLflow parent and children, and a trial's θ against the same config trained alone.

Trials are tiny (sine, a few meta-steps, a 16-16 MLP, one worker) and share the session's Ray where they can.
"""

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator import train
from orchestrator.cli.main import main
from orchestrator.config import load_config
from orchestrator.run import checkpoint
from orchestrator.sweep.plan import plan, trial_names
from orchestrator.sweep.report import TrialOutcome, comparison_plot, results_table
from orchestrator.sweep.search_space import expand, parse_search
from orchestrator.sweep.tuner import sweep

STEPS = 8


def write_config(tmp_path, name="sine", **sections):
    cfg = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "checkpoint_every": 4, "log_every": 1},
        "task": {"k_shot": 5, "query": 5},
        "model": {"hidden": [16, 16]},
        "algorithm": {"name": "maml", "inner_steps": 1, "inner_lr": 0.01},
        # SGD: ASHA compares trials by their loss; plain SGD makes outer.lr matter from the first step.
        "outer": {"meta_batch_size": 8, "steps": STEPS, "lr": 0.01, "optimizer": "sgd"},
        "workers": {"mode": "inprocess", "num_workers": 1, "num_cpus": 0.5, "learner_num_cpus": 0.5},
        "eval": {"tasks": 20, "steps": [0, 1], "batch_tasks": 10},
        "tracking": {"plots": False, "log_model": False, "log_checkpoint": False, "flush_every_s": 0.2},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STEPS_ASHA = 26  # ASHA rungs at steps 1, 3 and 9 (27 is past the end); room to interrupt the third trial


def mid_sweep(progress: str) -> tuple[set[str], bool]:
    """From `metaray sweep`'s progress lines: the trials that ended, and whether the third is past step 4."""
    last, ended = {}, set()
    for line in progress.splitlines():
        if m := re.match(r"  trial (\S+): step (\d+)/", line):
            last[m[1]] = int(m[2])
        elif m := re.match(r"  trial (\S+): (done|stopped early)", line):
            ended.add(m[1])
    return ended, last.get("sine-maml_lr-0.03", 0) >= 4


def children(client, parent_id):
    parent = client.get_run(parent_id)
    return {r.info.run_name: r for r in client.search_runs([parent.info.experiment_id],
                                                             f"tags.mlflow.parentRunId = '{parent_id}'")}


def steps_of(client, run_id, key="meta/loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# -- the search space, names and validation (no Ray) ----------------------------------------------------------

def test_search_spaces_expand_like_ray_tune():
    axes = [parse_search("outer.lr=grid([0.1, 0.01])"), parse_search("algorithm.inner_lr=loguniform(1e-3, 1)"),
            parse_search("run.seed=randint(0, 3)"), parse_search("algorithm.name=choice([maml, fomaml])")]
    trials = expand(axes, samples=300, seed=7)
    assert len(trials) == 600 and list(trials[0]) == ["outer.lr", "algorithm.inner_lr", "run.seed", "algorithm.name"]
    assert [t["outer.lr"] for t in trials[:4]] == [0.1, 0.01, 0.1, 0.01]  # every sample repeats the grid
    lrs = [t["algorithm.inner_lr"] for t in trials]
    assert all(1e-3 <= v <= 1 for v in lrs)
    below_geometric_mean = sum(v < math.sqrt(1e-3) for v in lrs) / len(lrs)  # log-uniform: half below √(ab)
    assert 0.42 < below_geometric_mean < 0.58
    assert {t["run.seed"] for t in trials} == {0, 1, 2}  # randint(a, b): a <= n < b, as in Ray Tune
    assert {t["algorithm.name"] for t in trials} == {"maml", "fomaml"}
    assert expand(axes, 300, seed=7) == trials and expand(axes, 300, seed=8) != trials


def test_trial_names_start_with_the_swept_values():
    names = trial_names([{"algorithm.inner_lr": 0.012345678, "outer.lr": 1e-3}, {"algorithm.inner_lr": 0.1,
                                                                                  "outer.lr": 1e-3}],
                        ["sine-maml", "sine-maml"])
    assert names == ["inner_lr-0.01235_lr-0.001_sine-maml", "inner_lr-0.1_lr-0.001_sine-maml"]
    # Two keys ending alike keep their full names; names that would repeat get the trial number.
    assert trial_names([{"algorithm.inner_lr": 1, "eval.inner_lr": 2}], ["s"]) == [
        "algorithm.inner_lr-1_eval.inner_lr-2_s"]
    assert trial_names([{"outer.lr": 0.1}, {"outer.lr": 0.1}], ["s", "s"]) == ["lr-0.1_s-t00", "lr-0.1_s-t01"]
    # Several config files: the file's run name is the first swept value.
    assert trial_names([{"config": "sine-maml", "outer.lr": 0.1}], ["sine-maml"]) == ["sine-maml_lr-0.1"]


@pytest.mark.parametrize("args, names", [
    (["--search", "outer.lr=lognormal(1, 2)"], "--search 'outer.lr=lognormal(1, 2)'"),
    (["--search", "outer.lr=uniform(2, 1)"], "needs a < b"),
    (["--search", "outer.lr=loguniform(0, 1)"], "needs 0 < a"),
    (["--search", "outer.lr=uniform(0, .inf)"], "two finite numbers"),
    (["--search", "outer.lr=randint(1.5, 3)"], "two integers"),
    (["--search", "outer.lr=grid([])"], "one non-empty list"),
    (["--search", "outer.lr"], "expected KEY=SPACE"),
    (["--search", "outer.lr=grid([0.1, {])"], "not valid YAML"),
    (["--search", "outer.lr=grid([0.1, ]"], "expected KEY=SPACE"),
    (["--grid", "outer.lr=[0.1, "], "--grid 'outer.lr=[0.1, '"),  # issue 12: was a YAML traceback
    (["--grid", "outer.lr=0.1"], "expected KEY=[v1, v2, ...]"),
    (["--search", "run.dir=grid([a, b])"], "set by the sweep"),
    (["--search", "outer.lrr=grid([1])"], "outer.lrr: unknown key"),
    (["--search", "outer.lr=grid([-1])"], "outer.lr"),
    (["--grid", "outer.lr=[1]", "--search", "outer.lr=grid([2])"], "swept twice"),
    (["--samples", "0"], "--samples"),
    (["--metric", "loss"], "--metric 'loss'"),
    (["--metric", "val/acc"], "only trials that validate report it; set eval.every"),
    (["--set", "workers.max_workers=2"], "workers.max_workers: 2 > workers.num_workers=1"),
    (["--resume", "--name", "nothing-here"], "no sweep in"),
])
def test_a_bad_sweep_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args, names):
    cfg = write_config(tmp_path)
    assert main(["sweep", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err, err
    assert not (tmp_path / "runs").exists()


def test_sweep_rejects_every_bad_config_before_running(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(f"run:\n  dir: {tmp_path / 'runs'}\n")
    bad.write_text("outer:\n  lr: -1\n")
    assert main(["sweep", str(good), str(bad), "--grid", "outer.steps=[1, 2]"]) == 2
    err = capsys.readouterr().err
    assert "outer.lr" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_plan_sets_each_trial_apart_and_sizes_its_placement_group(tmp_path):
    from orchestrator.sweep.trial import placement

    p = plan([str(write_config(tmp_path))], ["workers.mode=ray"],
             search=["workers.num_workers=grid([1, 3])", "outer.lr=uniform(0.001, 0.1)"], name="planned")
    assert [t.name for t in p.trials][0].startswith("num_workers-1_lr-0.0")
    for t in p.trials:
        assert t.config.run_dir == tmp_path / "runs" / "planned" / t.name
        assert t.config.tracking.uri.startswith("sqlite:////")  # absolute: trials run in Tune's trial folders
        assert t.config.outer.lr == t.swept["outer.lr"]
        bundles = placement(t.config).bundles
        assert bundles == [{"CPU": 0.5}] + [{"CPU": 0.5}] * t.config.workers.num_workers  # learner + workers
    assert p.settings["metric"] == "meta/loss"  # no validation: the training loss on the trials' common batches
    # Without --name, a sweep is named after what it sweeps (MLflow's run table cuts names at the end), numbered
    # when its folder is taken.
    unnamed = plan([str(write_config(tmp_path))], search=["outer.lr=grid([0.1])", "algorithm.inner_lr=grid([1])"])
    assert unnamed.name == "lr-inner_lr-sweep_sine"
    (tmp_path / "runs" / unnamed.name).mkdir(parents=True)
    (tmp_path / "runs" / unnamed.name / "sweep.json").write_text("{}")
    assert plan([str(write_config(tmp_path))], grid=["outer.lr=[0.1]", "algorithm.inner_lr=[1]"]).name == \
        "lr-inner_lr-sweep_sine-2"
    assert plan([str(write_config(tmp_path))], ["eval.every=2"], name="v").settings["metric"] == "val/loss"
    gpu = load_config(write_config(tmp_path), ["workers.mode=ray", "workers.num_gpus=0.25", "workers.num_workers=2"])
    assert placement(gpu).bundles == [{"CPU": 0.5}, {"CPU": 0.5, "GPU": 0.25}, {"CPU": 0.5, "GPU": 0.25}]
    assert placement(load_config(write_config(tmp_path))).bundles == [{"CPU": 0.5}]  # in-process: the learner only


def test_comparison_plot_marks_a_diverged_trial_instead_of_stretching_the_axes():
    def trial(name, curve, held_out, lr):
        return TrialOutcome(name, {"algorithm.inner_lr": lr, "outer.lr": 0.001}, {}, "completed", 3,
                            curve[-1][1], curve, curves={"eval/test/loss_curve": held_out})

    trials = [trial("a", [(1, 3.0), (2, 2.0), (3, 1.5)], [3.0, 1.0], 0.01),
              trial("b", [(1, 3.0), (2, 1.8e308), (3, math.inf)], [3.0, 1e33, math.nan], 0.1),
              trial("c", [(1, 3.0), (2, 2.5), (3, 2.2)], [3.0, 2.0], 0.001)]
    fig = comparison_plot(trials, "meta/loss", "t")
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert high < 10 and low > 0.5  # fitted to a and c, not to 1e33
        labels = ax.get_legend().get_texts()
        assert "b (diverged)" in [t.get_text() for t in labels]
        assert any(line.get_marker() == "x" for line in ax.get_lines())  # where b leaves the plot
    table = results_table(trials, "meta/loss", "min")
    head, _, *rows = table.splitlines()
    assert head.startswith("| run | algorithm.inner_lr | outer.lr | status |")  # one column per swept key
    assert rows[0].startswith("| a | 0.01 |") and "(diverged)" in rows[-1]


def test_register_makes_the_best_trials_model_a_registry_version(tmp_path, mlflow_store, capsys):
    from orchestrator.sweep.report import register_best

    p = plan([str(write_config(tmp_path))], name="reg")
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("sweep-register")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    models = {r: client.create_logged_model(experiment, name="model", source_run_id=r).model_id for r in runs}
    best = TrialOutcome(p.trials[0].name, {}, {}, "completed", 2, 1.0, run_id=runs[1])
    capsys.readouterr()
    for version in ("1", "2"):  # a second sweep adds a version
        register_best(best, p, "sine-best", sys.stdout)
        assert f"registered {best.name}'s model as sine-best version {version}" in capsys.readouterr().out
    versions = client.search_model_versions("name = 'sine-best'")
    assert len(versions) == 2 and {(v.run_id, v.source) for v in versions} == {(runs[1], f"models:/{models[runs[1]]}")}


# -- real Ray Tune ----------------------------------------------------------------------------------------------

def test_trials_live_in_their_placement_group_match_a_solo_run_and_a_crash_is_reported(tmp_path, ray_local,
                                                                                      mlflow_store):
    """Each trial's group takes every CPU of this Ray: workers outside it would never be placed. One trial
    crashes (its worker cannot start within 1 ms); the other trains on and equals the same config alone. Both
    are named after a float ('.' in the name): the best one's model is logged and registered all the same. The
    parent run holds the numbers the sweep compared."""
    half = ray_local.cluster_resources()["CPU"] / 2
    path = write_config(tmp_path, workers={"mode": "ray", "learner_num_cpus": half, "num_cpus": half},
                        run={"log_every": 2}, tracking={"log_model": True, "system_metrics": False})
    result = sweep([str(path)], grid=["workers.start_timeout_s=[60.5, 0.001]"], name="pg", experiment="sweep-pg",
                   max_concurrent=1, register="sine-pg")
    ok, crashed = result.trials
    assert ok.status == "completed" and ok.step == STEPS
    assert crashed.status == "failed" and "RunFailed" in crashed.error and "was not placed" in crashed.error
    assert result.failed == [crashed] and result.best is ok

    client = MlflowClient(mlflow_store)
    runs = children(client, result.parent_run_id)
    assert set(runs) == {ok.name, crashed.name}
    assert runs[ok.name].info.status == "FINISHED" and runs[crashed.name].info.status == "FAILED"
    assert steps_of(client, ok.run_id) == list(range(STEPS))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["best.run"] == ok.name and parent.data.metrics["sweep/failed"] == 1
    # The parent's meta/loss is what the sweep compared: the mean over each report's window, at its step (the
    # last one the results table's); the evaluation results sit at step 0 (bars), the held-out curve is whole.
    compared = sorted(client.get_metric_history(result.parent_run_id, "meta/loss"), key=lambda m: m.step)
    assert [m.step for m in compared] == [s for s, _ in ok.curve]
    assert [m.value for m in compared] == pytest.approx([v for _, v in ok.curve])
    assert parent.data.metrics["meta/loss"] == pytest.approx(ok.metric) and len(ok.curve) == STEPS // 2
    assert steps_of(client, result.parent_run_id, "eval/test/loss_step1") == [0]
    assert steps_of(client, result.parent_run_id, "eval/test/loss_curve") == [0, 1]
    assert "perf/step_s" not in parent.data.metrics  # the child's per-step training metrics stay in the child
    # The trial named after 60.5 has its model (MLflow refuses '.' in model names), registered as the best.
    assert ok.name == "start_timeout_s-60.5_sine"
    (model,) = client.search_logged_models([parent.info.experiment_id])
    (version,) = client.search_model_versions("name = 'sine-pg'")
    assert model.name == "start_timeout_s-60p5_sine" and version.source == f"models:/{model.model_id}"

    # Alone, in this process, with the same share count (the group sums shares in order, wherever they ran).
    solo = train(load_config(path, ["workers.mode=inprocess", "run.name=alone", "tracking.enabled=false"]),
                 evaluate=False)
    trial_theta = checkpoint.load(tmp_path / "runs" / "pg" / ok.name).params
    assert all(torch.equal(trial_theta[k], solo.params[k]) for k in solo.params)  # bit-identical


def test_asha_sweep_interrupted_then_resumed(tmp_path, ray_local, mlflow_store):
    """4 trials (2 configs x 2 outer.lr) under ASHA, one at a time so that ASHA's decisions are known: the
    first trial is never stopped, the second (outer.lr 1e-6) is worse at step 3 and stopped, the third (MAML
    at 0.03, a little ahead of FOMAML at 0.03 at every rung: 1, 3, 9) is never stopped. A real `metaray sweep`
    is SIGTERM'd during the third and resumed in-process: the stopped trial stays stopped, the interrupted one
    continues its checkpoint in its MLflow run, the fourth runs."""
    paths = [str(write_config(tmp_path, f"sine-{alg}", algorithm={"name": alg}, outer={"steps": STEPS_ASHA}))
             for alg in ("fomaml", "maml")]
    # The subprocess joins the session's Ray (as on a cluster) rather than starting one of its own, which saves
    # seconds; the resume below passes no --address, which must not count as another sweep.
    address = ray_local.get_runtime_context().gcs_address
    args = ["sweep", *paths, "--search", "outer.lr=grid([0.03, 0.000001])", "--scheduler", "asha",
            "--max-concurrent", "1", "--name", "asha", "--experiment", "sweep-asha", "--address", address]
    out = tmp_path / "first.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=f,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    # Interrupt once the third trial is past its Tune checkpoint at step 4 (it cannot finish before Tune sees
    # the signal: each of its reports waits for Tune's loop).
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not mid_sweep(out.read_text())[1]:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 143, out.read_text()[-3000:]
    first = out.read_text()
    assert "interrupted: every trial is checkpointed" in first
    ended = mid_sweep(first)[0]
    assert ended == {"sine-fomaml_lr-0.03", "sine-fomaml_lr-1e-06"}, first
    assert "trial sine-fomaml_lr-1e-06: stopped early at step 3" in first
    client = MlflowClient(mlflow_store)
    parent_id = json.loads((tmp_path / "runs" / "asha" / "sweep.json").read_text())["parent_run_id"]
    before = {name: (r.info.run_id, r.info.end_time, r.info.status) for name, r in children(client, parent_id).items()}
    assert before["sine-maml_lr-0.03"][2] == "KILLED" and client.get_run(parent_id).info.status == "KILLED"
    assert set(before) == {"sine-fomaml_lr-0.03", "sine-fomaml_lr-1e-06", "sine-maml_lr-0.03"}

    result = sweep(paths, search=["outer.lr=grid([0.03, 0.000001])"], scheduler="asha", max_concurrent=1,
                   name="asha", experiment="sweep-asha", resume=True)
    assert result.parent_run_id == parent_id and not result.failed
    status = {t.name: (t.status, t.step) for t in result.trials}
    assert status["sine-fomaml_lr-0.03"] == ("completed", STEPS_ASHA) and status["sine-maml_lr-0.03"][0] == "completed"
    assert status["sine-fomaml_lr-1e-06"] == ("stopped early", 3)  # stopped before the interruption, stays so
    assert result.best.swept["outer.lr"] == 0.03
    runs = children(client, parent_id)
    assert len(runs) == 4 and {r.info.status for r in runs.values()} == {"FINISHED"}  # no run started twice
    assert runs["sine-fomaml_lr-1e-06"].data.tags["metaray.sweep.trial"] == "stopped early at step 3"
    # Siblings in one experiment, each with its own config as params (the meaning of the old sweep test).
    assert {(r.data.params["algorithm.name"], r.data.params["outer.lr"]) for r in runs.values()} == {
        ("maml", "0.03"), ("maml", "1e-06"), ("fomaml", "0.03"), ("fomaml", "1e-06")}
    assert {r.info.experiment_id for r in runs.values()} == {client.get_run(parent_id).info.experiment_id}
    for t in result.trials:
        assert t.run_id == before.get(t.name, (t.run_id,))[0]
        assert steps_of(client, t.run_id) == list(range(t.step)), t.name  # every step once
        if t.name in ended:  # not run again
            assert runs[t.name].info.end_time == before[t.name][1], t.name
    log = (tmp_path / "runs" / "asha" / "sine-maml_lr-0.03" / "train.log").read_text()
    assert re.search(r"resuming \S+ at step ([4-9]|1[0-9]|2[0-5])\b", log), log  # its checkpoint, not step 0
    assert client.get_run(parent_id).info.status == "FINISHED"
    files = [a.path for folder in ("", "plots") for a in client.list_artifacts(parent_id, folder)]
    assert {"sweep_results.md", "best_config.yaml", "plots/sweep_comparison.png"} <= set(files)
    table = (tmp_path / "runs" / "asha" / "sweep_results.md").read_text()
    assert table.splitlines()[0].startswith("| run | config | outer.lr | status |")


@pytest.mark.slow  # ~40 s; in CI a sweep is interrupted and resumed (ASHA above), and a killed run resumes
# exactly once on Ray (test_exactly_once)
def test_a_sweep_killed_before_any_checkpoint_resumes_with_one_run_per_trial(tmp_path, ray_local, mlflow_store):
    """SIGKILL of `metaray sweep` as soon as a trial trains, before its first checkpoint. Resumed, the trial starts
    again from step 0 in the MLflow run it had begun (before, a second run: the first stayed empty, and the tag
    went to it): one run per trial, tagged with how it ended, every step once."""
    steps = 150
    path = write_config(tmp_path, "sine-kill", run={"checkpoint_every": 1000}, outer={"steps": steps})
    grid = "outer.lr=[0.01, 0.02]"
    args = ["sweep", str(path), "--grid", grid, "--max-concurrent", "2", "--name", "killed", "--experiment",
            "sweep-killed", "--address", ray_local.get_runtime_context().gcs_address]
    out = tmp_path / "first.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not re.search(r"  trial \S+: step \d+/",
                                                                                 out.read_text()):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    folders = [f for f in (tmp_path / "runs" / "killed").iterdir() if f.is_dir() and f.name != "tune"]
    begun = [f for f in folders if (f / "tracking").exists() and not (f / "checkpoint.pt").exists()]
    assert begun, out.read_text()[-3000:]  # a trial with an MLflow run and no checkpoint

    result = sweep([str(path)], grid=[grid], max_concurrent=2, name="killed", experiment="sweep-killed", resume=True)
    assert {t.status for t in result.trials} == {"completed"}
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.info.run_name for r in runs) == sorted(t.name for t in result.trials)  # one each
    for r in runs:
        assert r.data.tags["metaray.sweep.trial"] == "completed" and r.info.status == "FINISHED"
        assert steps_of(client, r.info.run_id) == list(range(steps)), r.info.run_name
