"""benchmarks/gpu_check.py in its quick CPU mode: it runs end to end here and says what it skipped without a GPU."""

from __future__ import annotations

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
