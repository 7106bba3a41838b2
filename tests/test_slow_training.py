"""Real training runs (minutes): the learned initialization must really beat the baselines. Run with -m slow."""

import pytest

from orchestrator import train
from orchestrator.config import load_config

pytestmark = pytest.mark.slow


def run(tmp_path, config, steps, *extra):
    cfg = load_config(config, [f"run.dir={tmp_path}", f"outer.steps={steps}", "workers.mode=inprocess",
                               "eval.tasks=300", "tracking.enabled=false", *extra])
    return train(cfg).results["test"]["loss"]


def test_maml_beats_transfer_and_scratch_on_sine(tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    maml = run(tmp_path, configs / "sine-maml.yaml", 4000)
    transfer = run(tmp_path, configs / "sine-transfer.yaml", 4000)
    scratch = run(tmp_path, configs / "sine-scratch.yaml", 0)
    assert maml[1].mean < 0.5 * transfer[1].mean
    assert maml[1].mean < 0.5 * scratch[1].mean
    assert maml[10].mean < maml[1].mean < maml[0].mean
    assert maml[1].mean + maml[1].ci95 < transfer[1].mean - transfer[1].ci95  # apart beyond the 95% CIs
