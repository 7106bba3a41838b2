"""A run with tracking off needs no MLflow: it trains and evaluates, through the CLI, in a process where importing
MLflow fails (as on a GPU machine that carries only Ray)."""

import subprocess
import sys
import textwrap

import yaml

BLOCKED = textwrap.dedent("""
    import sys
    sys.modules["mlflow"] = None  # any `import mlflow...` now raises ImportError
    from orchestrator.cli.main import main
    code = main(["train", sys.argv[1], "--set", "tracking.enabled=false"])
    loaded = sorted(m for m, v in sys.modules.items() if m.startswith("mlflow") and v is not None)
    print("exit", code, "mlflow modules", loaded)
    sys.exit(code)
""")


def test_tracking_off_trains_and_evaluates_without_mlflow(tmp_path):
    cfg = {"run": {"name": "off", "dir": str(tmp_path / "runs"), "log_every": 5},
           "task": {"k_shot": 5, "query": 5}, "model": {"hidden": [8]},
           "outer": {"meta_batch_size": 4, "steps": 5}, "workers": {"mode": "inprocess"},
           "eval": {"tasks": 10, "steps": [0, 1]}}
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exit 0 mlflow modules []" in done.stdout
    assert "step 5/5" in done.stdout and (tmp_path / "runs" / "off" / "eval.json").exists()
