"""The few-shot pipeline end to end with the real commands: PNGs in Omniglot layout -> store -> train -> eval."""

import subprocess
import sys

import yaml

from image_layouts import omniglot_folder


def metaray(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_convert_train_and_evaluate_protonet_on_a_generated_omniglot(tmp_path):
    folder = omniglot_folder(tmp_path / "src", {"Alpha": 6, "Beta": 6, "Gamma": 6}, drawings=6)
    conv = metaray("data", "convert", "omniglot", str(folder), str(tmp_path / "omni.arrow"), "--size", "16",
                   cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr
    cfg = {
        "run": {"name": "fs", "dir": str(tmp_path / "runs"), "log_every": 5},
        "task": {"family": "images", "store": str(tmp_path / "omni.arrow"), "n_way": 3, "k_shot": 1, "query": 2,
                 "rotations": True, "split": {"by": "group", "train": ["Alpha", "Beta"], "test": ["Gamma"]}},
        "model": {"backbone": "conv4", "width": 8},
        "algorithm": {"name": "protonet"},
        "outer": {"meta_batch_size": 2, "steps": 10},
        "workers": {"mode": "inprocess", "num_workers": 2},
        "eval": {"tasks": 20, "steps": [0, 2]},
        "tracking": {"log_model": False},
    }
    (tmp_path / "fs.yaml").write_text(yaml.safe_dump(cfg))
    proc = metaray("train", str(tmp_path / "fs.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc_lines = [line for line in proc.stdout.splitlines() if " acc " in line]
    assert acc_lines and "(n=20)" in acc_lines[0] and "2 steps:" in acc_lines[0]
    # K+Q larger than the images a class has: refused before training, exit 2, one line.
    cfg["task"]["query"] = 6
    cfg["run"]["name"] = "too-many"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    bad = metaray("train", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "runs" / "too-many").exists()
