"""The few-shot pipeline end to end with the real commands: PNGs in Omniglot layout -> store -> train -> eval."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process evaluation keeps to one core


def metaray(*args, cwd) -> subprocess.Popen:
    """``metaray *args`` started in ``cwd``, its output captured; see ``finished``."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``proc`` once it ends; killed if it takes more than 10 minutes."""
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def omniglot_characters(root: Path, alphabets: dict[str, int], drawings: int, flip: float = 0.1) -> Path:
    """The Omniglot layout with classes to learn: each character's drawings are one random 21 x 21 black-and-white
    pattern with a fraction ``flip`` of its pixels flipped (``image_layouts.omniglot_folder`` draws every image
    independently, which a model cannot classify above chance)."""
    rng = np.random.default_rng(0)
    folder, char_id = root / "images_background", 1
    for alphabet, characters in alphabets.items():
        for c in range(1, characters + 1):
            pattern = rng.random((21, 21)) > 0.2  # mostly white, black strokes
            for d in range(1, drawings + 1):
                path = folder / alphabet / f"character{c:02d}" / f"{char_id:04d}_{d:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pattern ^ (rng.random((21, 21)) < flip)).save(path)
            char_id += 1
    return folder


def printed_scores(stdout: str, label: str, evaluation: str) -> dict[str, dict[str, str]]:
    """``{metric: {steps: "mean ± ci95"}}`` from the evaluation table ``train`` prints."""
    scores = {}
    for line in stdout.splitlines():
        fields = line.split()
        if fields[:2] == [label, evaluation]:
            assert fields[3] == "(n=20)", line
            scores[fields[2]] = dict(re.findall(r"(\d+) steps: (\S+ ± \S+)", line))
    return scores


def untrained_test_loss(cfg: dict) -> float:
    """The held-out query loss of the initial θ of a run of ``cfg``, on its evaluation episodes, in this process."""
    from learners.params import ParamSpec
    from orchestrator.build import build_algorithm
    from orchestrator.config import parse_config
    from orchestrator.run.evaluation import evaluate_all
    from orchestrator.workers.group import LocalGroup

    config = parse_config({**cfg, "eval": {**cfg["eval"], "steps": [0]}})  # the same episodes, no fine-tuning
    params = build_algorithm(config).init_params(config.run.seed)
    results, _ = evaluate_all(config, LocalGroup(config), ParamSpec.of(params).flatten(params).numpy())
    return results["test"]["loss"][0].mean


@pytest.mark.slow  # image runs on a real store: the MetaOptNet and augmentation Ray tests in CI
def test_convert_train_and_evaluate_protonet_on_a_generated_omniglot(tmp_path):
    folder = omniglot_characters(tmp_path / "src", {"Alpha": 6, "Beta": 6, "Gamma": 6}, drawings=6)
    code, _, err = finished(metaray("data", "convert", "omniglot", str(folder), str(tmp_path / "omni.arrow"),
                                    "--size", "16", cwd=tmp_path))
    assert code == 0, err
    cfg = {
        "run": {"name": "fs", "dir": str(tmp_path / "runs"), "log_every": 5},
        "task": {"family": "images", "store": str(tmp_path / "omni.arrow"), "n_way": 3, "k_shot": 1, "query": 2,
                 "rotations": True, "split": {"by": "group", "train": ["Alpha", "Beta"], "test": ["Gamma"]}},
        "model": {"backbone": "conv4", "width": 8},
        "algorithm": {"name": "protonet"},
        "outer": {"meta_batch_size": 2, "steps": 10, "lr": 0.01},
        "workers": {"mode": "inprocess", "num_workers": 2},
        "eval": {"tasks": 20, "steps": [0, 2]},
        "tracking": {"log_model": False},
    }
    (tmp_path / "fs.yaml").write_text(yaml.safe_dump(cfg))
    train = metaray("train", str(tmp_path / "fs.yaml"), cwd=tmp_path)
    try:
        untrained = untrained_test_loss(cfg)  # on the second core while the run trains: the test takes no longer
    finally:
        code, out, err = finished(train)
    assert code == 0, err[-3000:]

    # The table printed is the eval.json saved.
    saved = json.loads((tmp_path / "runs" / "fs" / "eval.json").read_text())["test"]
    assert printed_scores(out, "protonet", "test") == {
        metric: {s: f"{score['mean']:.3f} ± {score['ci95']:.3f}" for s, score in by_step.items()}
        for metric, by_step in saved.items()}
    assert set(saved["acc"]) == {"0", "2"} and all(score["n"] == 20 for score in saved["acc"].values())
    # Evaluation works: held-out classes (alphabet Gamma) are told apart well above chance (1/3; measured 0.53).
    assert saved["acc"]["0"]["mean"] > 1 / 3 + 0.1, saved["acc"]
    # Training works: 10 steps took the held-out query loss from the initial θ's 1.40 to 0.98 (below ln 3,
    # a uniform guess); broken steps (skipped, not applied, the wrong sign) leave it where it started or raise it.
    assert saved["loss"]["0"]["mean"] < min(untrained - 0.2, math.log(3)), (saved["loss"], untrained)

    # K+Q larger than the images a class has: refused before training, exit 2, one line.
    cfg["task"]["query"] = 6
    cfg["run"]["name"] = "too-many"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = finished(metaray("train", str(tmp_path / "bad.yaml"), cwd=tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "too-many").exists()
