"""Evaluation reporting when tasks diverge: counted and said in words, left out of the means, in the terminal
and in MLflow; plots and summaries of a run whose every step was skipped; `metaray eval` runs linked."""

import io
import json
import math
import warnings

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import tiny_config
from orchestrator import evaluate_checkpoint, train
from orchestrator.run.evaluation import curve_summaries, summarize, table
from orchestrator.tracking.plots import learning_curves


def test_diverged_tasks_are_counted_and_left_out_of_the_mean():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.5, 2.0, size=(600, 11))
    acc = rng.uniform(0.2, 0.9, size=(600, 11))
    loss[:12, 10] = np.nan  # 12 tasks diverge at 10 steps, two more already at 5 (and stay so)
    loss[12:14, 5:] = np.inf
    loss[14, 10] = 1e33  # finite, but diverged all the same (a million times its loss before adapting)
    loss[15, 10] = 1e5  # a bad fit, 1e5 times worse than before: counted in the mean
    acc[:15, 10] = 0.2  # the accuracy of NaN logits is a number, but means nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy "invalid value" warnings either
        results = summarize({"loss": loss, "acc": acc}, [0, 5, 10])
        text = table("maml", {"test": results})
    kept = loss[15:, 10]  # an independent computation over the tasks that did not diverge
    assert results["loss"][10].mean == pytest.approx(kept.mean())
    assert results["loss"][10].ci95 == pytest.approx(1.96 * kept.std(ddof=1) / math.sqrt(len(kept)))
    assert results["acc"][10].mean == pytest.approx(acc[15:, 10].mean())
    assert (results["loss"][10].n, results["loss"][10].diverged) == (585, 15)
    assert (results["loss"][0].n, results["loss"][0].diverged) == (600, 0)
    assert "2 of 600 held-out tasks diverged at 5 steps, 15 at 10 steps" in text
    assert "nan" not in text and "(n=600)" in text
    mean, ci = curve_summaries({"loss": loss, "acc": acc})["acc"]
    assert mean[10] == pytest.approx(acc[15:, 10].mean()) and np.isfinite(ci).all()


def _no_nan(token: str):
    raise AssertionError(f"{token} is not JSON")


def test_a_run_whose_every_step_diverged_finishes_and_says_so(tmp_path, mlflow_store):
    """--set algorithm.inner_lr=1e308 --set algorithm.inner_steps=3: every meta-step is skipped, every held-out
    task diverges after adaptation. Before, the plots raised KeyError 'meta/loss' after evaluation."""
    cfg = tiny_config(tmp_path, run={"name": "diverged"}, outer={"steps": 3},
                      algorithm={"name": "maml", "inner_lr": 1e308, "inner_steps": 3},
                      tracking={"uri": mlflow_store, "experiment": "report-test", "plots": True})
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = train(cfg, out=out)
    assert result.skipped_steps == 3 and "meta/loss" not in result.history
    assert "20 of 20 held-out tasks diverged at 1 step (left out of the means)" in out.getvalue()
    assert "nan" not in out.getvalue()
    assert "step 3/3" in out.getvalue() and "skipped 3" in out.getvalue()
    assert "nothing trained: all 3 meta-steps were skipped" in out.getvalue()
    saved = json.loads((cfg.run_dir / "eval.json").read_text(), parse_constant=_no_nan)  # strict JSON: no NaN
    assert saved["test"]["loss"]["1"]["mean"] is None and saved["test"]["loss"]["1"]["diverged"] == 20
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["metaray.trained"] == "nothing" and run.data.tags["metaray.skipped_steps"] == "3"
    assert run.data.tags["mlflow.note.content"].startswith("nothing trained")
    metrics = run.data.metrics
    assert metrics["eval/test/diverged_step1"] == 20 and metrics["eval/test/diverged_step0"] == 0
    assert "eval/test/loss_step1" not in metrics and "eval/test/loss_step0" in metrics  # no NaN point
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/eval_curves.png"} <= plots

    # `metaray eval` of it: a run of its own, named for and nested under the training run.
    out = io.StringIO()
    evaluate_checkpoint(cfg.run_dir, out=out)
    assert "20 of 20 held-out tasks diverged at 1 step" in out.getvalue()
    (evaluation,) = client.search_runs([run.info.experiment_id], f"tags.`metaray.evaluates` = '{result.run_id}'")
    assert evaluation.info.run_name == "diverged-eval"
    assert evaluation.data.tags["mlflow.parentRunId"] == result.run_id
    assert evaluation.data.metrics["eval/test/diverged_step1"] == 20


def test_learning_curves_draw_what_exists():
    history = {"inner/loss_before": [1.0, 0.5, float("nan"), 0.25], "orchestrator/skipped_steps": [0, 0, 1, 1]}
    fig = learning_curves(history, 0)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["inner/loss_before"]
    empty = learning_curves({"orchestrator/skipped_steps": [1.0, 2.0]}, 0)
    assert "2 steps skipped" in empty.axes[0].texts[0].get_text()
