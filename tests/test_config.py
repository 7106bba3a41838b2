"""Config validation and the CLI's handling of user mistakes (exit 2, one line naming the key)."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.config import ConfigError, load_config, parse_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"outer": {"bogus": 1}}, "outer.bogus", "unknown key (allowed here: optimizer, lr"),
        ({"sections": {}}, "sections", "unknown key"),
        ({"outer": {"lr": "fast"}}, "outer.lr", "valid number"),
        ({"outer": {"lr": -0.1}}, "outer.lr", "greater than 0"),
        ({"task": {"k_shot": True}}, "task.k_shot", "valid integer"),
        ({"outer": {"steps": "50"}}, "outer.steps", "valid integer"),
        ({"outer": {"lr": float("inf")}}, "outer.lr", "finite number"),
        ({"task": {"amplitude": [0.1, float("nan")]}}, "task.amplitude.1", "finite number"),
        ({"algorithm": {"name": "maml", "svm_c": 1.0}}, "algorithm.svm_c", "a setting of metaoptnet-svm"),
        ({"algorithm": {"name": "protonet"}}, "algorithm.name", "works on task.family images"),
        ({"algorithm": {"name": "mamal"}}, "algorithm.name", "'maml'"),
        ({"task": {"family": "cosine"}}, "task.family", "unknown task family 'cosine'"),
        ({"eval": {"probes": {"p": {"x_rang": [0, 1]}}}}, "eval.probes.p.x_rang", "unknown key"),
        ({"algorithm": {"name": "scratch"}}, "outer.steps", "set outer.steps: 0"),
    ],
)
def test_bad_config_names_the_key(data, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "c.yaml")
    msg = str(err.value)
    assert f"{key}: " in msg and words in msg and "\n" not in msg


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"outer": {"lr": -1, "steps": "many"}, "workers": {"num_workers": 0}})
    msg = str(err.value)
    assert "outer.lr" in msg and "outer.steps" in msg and "workers.num_workers" in msg


def test_overrides_are_typed_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("outer:\n  lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string; metaray reads a number
    assert load_config(path).outer.lr == 0.001
    cfg = load_config(path, ["outer.lr=1e-2", "task.support_x_range=[0, 5]", "workers.address=null"])
    assert cfg.outer.lr == 0.01 and cfg.task.support_x_range == (0.0, 5.0) and cfg.workers.address is None
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["outer.lr"])


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        ("outer:\n  bogus: 1\n", [], "outer.bogus"),
        ("outer:\n  lr: abc\n", [], "outer.lr"),
        ("outer:\n  lr: -1\n", [], "outer.lr"),
        ("task:\n  k_shot: true\n", [], "task.k_shot"),
        ("outer:\n  lr: .inf\n", [], "outer.lr"),
        ("algorithm:\n  name: mamal\n", [], "algorithm.name"),
        ("{}\n", ["outer.lr=-3"], "outer.lr"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, yaml_text, overrides, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    args = ["train", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{key}:" in err and err.startswith("metaray: error:")
    assert not (tmp_path / "runs").exists()


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden: [4]\n")
    proc = run_cli("train", str(path))
    assert proc.returncode == 2
    assert "model.hiden: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_and_unparsable_config_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["train", str(tmp_path)]) == 2  # a folder given for the config
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder, not a config file" in err
    bad = tmp_path / "broken.yaml"
    bad.write_text("outer: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.run.name == path.stem  # a run folder named after its config
