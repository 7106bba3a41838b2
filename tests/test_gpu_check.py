"""benchmarks/gpu_check.py in its quick CPU mode: it runs end to end here and says what it skipped without a GPU;
and its Ray check (``--ray --cpu``): real ``metaray train`` runs on Ray, with MLflow missing as on the GPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_quick_runs_on_cpu_and_reports_what_it_skipped():
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--budget", "240"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "gpu_check: passed" in out
    for workload in ("sine MAML", "Conv-4 MAML 5w1s", "Conv-4 ProtoNet 5w1s", "ResNet-12 SVM 5w1s"):
        rows = [line for line in out.splitlines() if line.startswith(workload)]
        assert rows and all("failed" not in r for r in rows), workload
        tokens = rows[0].split()
        at = tokens.index("fp32")  # then: eager tasks/s, compiled, ms per episode
        assert float(tokens[at + 1]) > 0 and float(tokens[at + 3]) > 0
    assert any(line.startswith("sine MAML") and " bf16 " in line for line in out.splitlines())
    if not torch.cuda.is_available():
        assert "CUDA tests: skipped (no CUDA device)" in out
        assert "parity CPU vs CUDA: skipped (no CUDA device)" in out
        assert "Ray worker throughput on the GPU: skipped (no CUDA device)" in out


def test_gpu_check_ray_trains_on_ray_with_tracking_off_where_mlflow_is_missing(tmp_path):
    # A package named mlflow that fails on import, first on the path of the check and of its Ray workers: a run
    # with tracking off must never import MLflow (the GPU machine has none).
    blocker = tmp_path / "missing" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no MLflow on this machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--ray", "--cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "gpu_ray: passed" in out and "MLflow imported by these runs: no" in out
    for setup, strategy in (("in-process", "auto"), ("Ray 2 workers", "auto")):
        row = next(line for line in out.splitlines() if line.startswith("sine MAML") and setup in line)
        tasks_per_s, step, compute = (float(v) for v in row.split(strategy)[1].split()[:3])
        assert tasks_per_s > 0 and step >= compute > 0
    image = next(line for line in out.splitlines() if line.startswith("Conv-4 SVM 5w1s") and "Ray 1 worker" in line)
    assert " onepass " in image and float(image.split("onepass")[1].split()[0]) > 0
    exact = re.search(r"exactness: sine MAML .* relative (\S+) ok", out)
    assert exact and float(exact[1]) <= 1e-5
    assert re.search(r"Ray's floor on this machine: [\d.]+ ms", out)
