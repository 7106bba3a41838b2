"""Ray workers on a GPU, end to end: real ``metaray train`` runs (the CLI's code path), tracking off, one table.

``python benchmarks/gpu_check.py --ray`` runs this. In one process it starts Ray once, then calls the CLI's
``main(["train", CONFIG, "--set", ...])`` for every row (each run starts its own workers; Ray is already up),
on generated image stores:

- setups: in-process on the device; Ray with 1 worker (``num_gpus: 1``); Ray with 2 and 4 workers sharing the
  GPU (``num_gpus: 0.5``, ``0.25``); for sine MAML also 8 CPU workers;
- workloads: sine MAML (meta-batch 25); Conv-4 MAML 5-way 1-shot (28x28, meta-batch 32); ResNet-12 ProtoNet and
  MetaOptNet-SVM 5-way 1-shot at 84x84 (15 queries per class, meta-batch 8); images in float32 and bfloat16
  (``model.precision``), each with the per-task strategy ``auto`` picks and, for the head-only learners,
  ``onepass``;
- columns, from the run's ``perf:`` line (medians after the first tenth of the steps): tasks/s, step ms,
  compute ms (the slowest share's), overhead ms (step - compute: on Ray rows, Ray's part), the GPU's
  utilization sampled every 50 ms between the run's first and last progress lines (NVML, else
  ``nvidia-smi``), and the largest worker's peak GPU memory against its cap (``num_gpus`` x the GPU's memory,
  which each worker enforces).

Then Ray's floor on this machine (``benchmarks/ray_floor.py``: a step's empty calls) next to sine's overhead with
2 workers; exactness: each workload's Ray 2-worker run against its in-process run (same seed, same 2 shares), θ
after the last step to ``EXACT`` relative; the fault drill: the sine and Conv-4 Ray 2-worker runs again with
worker 1 killed mid-run (``METARAY_FAULT_DRILL``): the share is recomputed and θ equals the uninterrupted run.
Last, the targets with yes/no. Rows run in order of what the targets need first; those that do not fit in
``--budget`` are listed as skipped (run them with ``--rows``). Exit status 1 when exactness or the drill fails.

On the GPU machine (Python 3.12, PyTorch with CUDA, numpy, pyarrow, pyyaml; no registry, no MLflow), from the
project's root, with Ray's bundle in ``.gpu/`` (``../shared/tools/ray-bundle.sh`` writes it here; the call
carries ``.gpu``), in one call:

    python3 -c "import tarfile; tarfile.open('.gpu/ray-slim.tar.xz').extractall('.site')" \\
      && python3 -m pip install -q --no-index --no-deps --no-compile --target .site .gpu/*.whl \\
      && export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 \\
      && python3 benchmarks/gpu_check.py --ray --budget 270 2>&1 | tee $OUT/gpu_ray.log

Without a GPU, the same rows on the CPU (``--cpu``; ``--quick``: tiny, what ``tests/test_gpu_check.py`` runs):

    python benchmarks/gpu_check.py --ray --cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EXACT = 1e-5  # Ray against in-process on the same device, relative distance of θ
PERF = re.compile(r"perf: .*?step ([\d.]+) ms, compute ([\d.]+) ms, overhead \(step - compute\) ([\d.]+) ms, "
                  r"([\d.]+) tasks/s(?:, peak GPU memory of a worker (\d+) MB)?")
DRILL = {"worker": 1, "step": 3, "action": "exit"}


@dataclass(frozen=True)
class Workload:
    label: str
    config: str
    sets: tuple[str, ...]
    steps: int
    head_only: bool = False
    images: bool = True


@dataclass(frozen=True)
class Setup:
    label: str
    workers: int  # 0: in-process
    gpus: float  # per worker (Ray); 0: on the CPU

    def sets(self, device: str) -> list[str]:
        if not self.workers:
            return ["workers.mode=inprocess", f"workers.device={device}"]
        return ["workers.mode=ray", f"workers.num_workers={self.workers}", f"workers.num_gpus={self.gpus:g}",
                f"workers.device={'cuda' if self.gpus else 'cpu'}"]


@dataclass
class Row:
    workload: Workload
    setup: Setup
    precision: str
    strategy: str
    drill: bool = False
    run_dir: Path | None = None
    perf: dict[str, float] = field(default_factory=dict)
    utilization: float | None = None
    error: str = ""

    @property
    def name(self) -> str:
        text = f"{self.workload.label} {self.setup.label} {self.precision} {self.strategy}{' drill' if self.drill else ''}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def stores(folder: Path, quick: bool) -> dict[str, str]:
    """Generated image stores: an Omniglot-shaped one (groups = alphabets) and a miniImageNet-shaped one (groups =
    the train / val / test split)."""
    from tasks.store_writer import StoreWriter

    def write(name: str, shape: tuple[int, int, int], groups: list[str], classes: int, per_class: int) -> str:
        dest = folder / f"{name}.arrow"
        rng = np.random.default_rng(len(name))
        with StoreWriter(dest, shape, source="generated", preprocessing="random strokes") as w:
            for c in range(classes):
                pixels = ((rng.random((per_class, *shape)) > 0.8) * 255).astype(np.uint8)
                group = groups[c % len(groups)]
                w.add_class(f"{group}/class{c:03d}", group, pixels)
        return str(dest)

    if quick:
        return {"omniglot": write("omniglot", (1, 28, 28), [f"Alphabet{i}" for i in range(4)], 16, 8),
                "mini": write("mini", (3, 16, 16), ["train", "val", "test"], 18, 8)}
    return {"omniglot": write("omniglot", (1, 28, 28), [f"Alphabet{i}" for i in range(4)], 48, 20),
            "mini": write("mini", (3, 84, 84), ["train", "val", "test"], 30, 20)}


def workloads(store: dict[str, str], quick: bool) -> dict[str, Workload]:
    # --quick: a narrow Conv-4 in place of ResNet-12 (whose widths are fixed), so that CI runs it in seconds
    mini = (f"task.store={store['mini']}", "task.train.n_way=null", "task.train.k_shot=null", "task.train.query=null",
            "task.augment=null", "eval.every=0", f"outer.meta_batch_size={2 if quick else 8}",
            *(["task.query=1", "model.backbone=conv4", "model.width=8"] if quick else ["model.backbone=resnet12"]))
    return {
        "sine": Workload("sine MAML", "configs/sine-maml.yaml", (), 20 if quick else 300, images=False),
        "conv4": Workload("Conv-4 MAML 5w1s", "configs/omniglot-maml-5w1s.yaml",
                          (f"task.store={store['omniglot']}", f"outer.meta_batch_size={2 if quick else 32}",
                           *(["model.width=16", "task.query=1"] if quick else [])), 3 if quick else 30),
        "protonet": Workload("ResNet-12 ProtoNet 5w1s", "configs/miniimagenet-protonet-5w1s.yaml", mini,
                             2 if quick else 12, head_only=True),
        "svm": Workload("Conv-4 SVM 5w1s" if quick else "ResNet-12 SVM 5w1s",
                        "configs/miniimagenet-metaoptnet-svm-5w1s.yaml", mini, 2 if quick else 12, head_only=True),
    }


def setups(cuda: bool) -> dict[str, Setup]:
    g = 1.0 if cuda else 0.0
    return {"in-process": Setup("in-process", 0, 0.0), "ray1": Setup("Ray 1 worker", 1, g),
            "ray2": Setup("Ray 2 workers", 2, g / 2), "ray4": Setup("Ray 4 workers", 4, g / 4),
            "cpu8": Setup("Ray 8 CPU workers", 8, 0.0)}


def plan(w: dict[str, Workload], s: dict[str, Setup], quick: bool) -> list[Row]:
    """The rows, in the order the targets need them (what does not fit the budget is at the end)."""
    if quick:  # each code path once: in-process and Ray (exactness), an image workload in one pass through Ray
        return [Row(w["sine"], s["in-process"], "float32", "auto"), Row(w["sine"], s["ray2"], "float32", "auto"),
                Row(w["svm"], s["ray1"], "float32", "onepass")]
    rows = [Row(w["sine"], s[k], "float32", "auto") for k in ("ray2", "in-process", "ray1", "ray4", "cpu8")]
    rows.append(Row(w["sine"], s["ray2"], "float32", "auto", drill=True))
    rows += [Row(w["svm"], s["ray1"], p, st) for p in ("float32", "bfloat16") for st in ("auto", "onepass")]
    rows += [Row(w["conv4"], s[k], "float32", "auto") for k in ("ray1", "ray4", "in-process", "ray2")]
    rows.append(Row(w["conv4"], s["ray2"], "float32", "auto", drill=True))
    rows += [Row(w["svm"], s[k], p, st) for k in ("in-process", "ray2", "ray4") for p in ("float32", "bfloat16")
             for st in ("auto", "onepass")]
    rows += [Row(w["protonet"], s[k], p, st) for k in ("ray1", "in-process", "ray2", "ray4")
             for p in ("float32", "bfloat16") for st in ("auto", "onepass")]
    rows += [Row(w["conv4"], s[k], "bfloat16", "auto") for k in ("ray1", "ray4", "in-process", "ray2")]
    return rows


# -- measuring one run ---------------------------------------------------------------------------------------

class Output(io.TextIOBase):
    """What a run prints, with the time of each progress line ("step N/M ...")."""

    def __init__(self):
        self.text, self.steps = [], []

    def write(self, s: str) -> int:
        if s.startswith("step "):
            self.steps.append(time.monotonic())
        self.text.append(s)
        return len(s)

    def value(self) -> str:
        return "".join(self.text)


class GpuSampler:
    """The GPU's utilization every ``every_s`` seconds, in a thread (NVML, else nvidia-smi); nothing on a CPU."""

    def __init__(self, every_s: float = 0.05):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._read = _nvml() or _nvidia_smi()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True) if self._read else None
        if self._thread:
            self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            value = self._read()
            if value is not None:
                self.samples.append((time.monotonic(), value))

    def mean(self, start: float, end: float) -> float | None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        inside = [v for t, v in self.samples if start <= t <= end]
        return float(np.mean(inside)) if inside else None


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
        return None


def _nvidia_smi():
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            return float(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    return read if torch.cuda.is_available() and read() is not None else None


def train(row: Row, folder: Path, device: str) -> None:
    """``metaray train`` for ``row`` through the CLI's main(), in this process (Ray is up already)."""
    from orchestrator.cli.main import main
    from orchestrator.workers.faults import DRILL_ENV

    w = row.workload
    row.run_dir = folder / "runs" / row.name
    sets = [*w.sets, *row.setup.sets(device), f"algorithm.strategy={row.strategy}", "tracking.enabled=false",
            f"outer.steps={w.steps}", f"run.log_every={max(1, w.steps // 10)}", f"run.dir={folder / 'runs'}",
            f"run.name={row.name}", "run.checkpoint_every=100000", "eval.tasks=2", "eval.steps=[0]"]
    if w.images:
        sets.append(f"model.precision={row.precision}")
    if row.drill:
        os.environ[DRILL_ENV] = json.dumps(DRILL)
    if device == "cuda" and torch.cuda.is_initialized():  # this process computed on the GPU (an in-process row)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out, err = Output(), io.StringIO()
    sampler = GpuSampler()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["train", str(ROOT / w.config), *[a for s in sets for a in ("--set", s)]])
    finally:
        os.environ.pop(DRILL_ENV, None)
        utilization = sampler.mean(out.steps[0] if out.steps else 0.0, out.steps[-1] if out.steps else 0.0)
    text = out.value()
    found = PERF.search(text)
    if code != 0 or found is None:
        lines = [line for line in (err.getvalue() + text).splitlines() if line.strip()]
        row.error = f"exit {code}: " + " | ".join(lines[-3:])[:300]
        return
    row.perf = {"step": float(found[1]), "compute": float(found[2]), "overhead": float(found[3]),
                "tasks_per_s": float(found[4]), "peak_mb": float(found[5]) if found[5] else math.nan}
    row.utilization = utilization
    _wait_for_gpu_release(device)


def _wait_for_gpu_release(device: str, timeout_s: float = 10.0) -> None:
    """Until the run's worker processes have left the GPU (they end just after the run), so that the next run's
    workers get their whole share of its memory. Counted, not matched by pid: NVML may see another pid namespace."""
    if device != "cuda":
        return
    try:
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mine = 1 if torch.cuda.is_initialized() else 0  # this process's own context, after an in-process row
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle)) > mine:
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - no NVML: give them a moment
        time.sleep(2.0)


def theta(run_dir: Path) -> torch.Tensor:
    from orchestrator.run import checkpoint

    params = checkpoint.load(run_dir).params
    return torch.cat([v.reshape(-1).double() for v in params.values()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- the report ----------------------------------------------------------------------------------------------

def cap_mb(row: Row, total_mb: float | None) -> str:
    if total_mb is None or not row.setup.gpus and row.setup.workers:
        return "-"
    share = 1.0 if not row.setup.workers else min(1.0, row.setup.gpus)
    return f"{share * total_mb:.0f}"


def table(rows: list[Row], total_mb: float | None) -> list[str]:
    out = [f"{'workload':<24}{'setup':<19}{'prec':<6}{'strategy':<9}{'tasks/s':>9}{'step ms':>9}{'compute':>9}"
           f"{'overhead':>9}{'GPU %':>7}{'peak MB':>9}{'cap MB':>8}"]
    for r in rows:
        if r.drill:
            continue
        head = f"{r.workload.label:<24}{r.setup.label:<19}{'bf16' if r.precision == 'bfloat16' else 'fp32':<6}" \
               f"{r.strategy:<9}"
        if r.error:
            out.append(head + f"  failed: {r.error}")
            continue
        if not r.perf:
            continue
        p = r.perf
        util = f"{r.utilization:.0f}" if r.utilization is not None else "-"
        peak = f"{p['peak_mb']:.0f}" if not math.isnan(p["peak_mb"]) else "-"
        # In-process the shares run one after the other: step - the slowest share's compute is no Ray overhead.
        overhead = f"{p['overhead']:.2f}" if r.setup.workers else "-"
        out.append(head + f"{p['tasks_per_s']:>9.1f}{p['step']:>9.2f}{p['compute']:>9.2f}{overhead:>9}"
                          f"{util:>7}{peak:>9}{cap_mb(r, total_mb):>8}")
    return out


def checks(rows: list[Row]) -> tuple[bool, list[str]]:
    """Exactness (Ray 2 workers against in-process, same shares) and the drill (against the same Ray run)."""
    ok, lines = True, []
    done = {(r.workload.label, r.setup.label, r.precision, r.strategy, r.drill): r for r in rows if r.perf}
    for r in rows:
        if not r.perf or r.setup.label != "Ray 2 workers":
            continue
        key = (r.workload.label, "in-process", r.precision, r.strategy, False)
        if not r.drill and key in done:
            rel = relative(theta(r.run_dir), theta(done[key].run_dir))
            ok &= rel <= EXACT
            lines.append(f"exactness: {r.workload.label} {r.precision} {r.strategy}, Ray 2 workers against in-process "
                         f"(same seed, 2 shares), θ after {r.workload.steps} steps: relative {rel:.1e} "
                         f"{'ok' if rel <= EXACT else 'FAILED'} (<= {EXACT:g})")
        if r.drill:
            plain = done.get((r.workload.label, r.setup.label, r.precision, r.strategy, False))
            if plain is None:
                continue
            rel = relative(theta(r.run_dir), theta(plain.run_dir))
            good = rel <= EXACT
            ok &= good
            lines.append(f"fault drill: {r.workload.label}, worker {DRILL['worker']} killed at step {DRILL['step']}: "
                         f"θ against the uninterrupted run: relative {rel:.1e} {'ok' if good else 'FAILED'}")
    return ok, lines


def targets(rows: list[Row], floor: float | None, cuda: bool) -> list[str]:
    def find(workload: str, setup: str, **kw) -> list[Row]:
        return [r for r in rows if r.perf and not r.drill and r.workload.label == workload
                and r.setup.label == setup and all(getattr(r, k) == v for k, v in kw.items())]

    lines = []
    sine = find("sine MAML", "Ray 2 workers")
    if sine and floor is not None:
        o = sine[0].perf["overhead"]
        good = o <= 1.5 or o <= floor + 0.5
        lines.append(f"target: sine, 2 Ray workers, overhead <= 1.5 ms or <= floor + 0.5 ms: {o:.2f} ms, floor "
                     f"{floor:.2f} ms: {'yes' if good else 'no'}")
    svm = find("ResNet-12 SVM 5w1s", "Ray 1 worker")
    if svm:
        best = min(svm, key=lambda r: r.perf["step"])
        ms = 1e3 / best.perf["tasks_per_s"]
        lines.append(f"target: ResNet-12 MetaOptNet-SVM 5w1s through Ray <= 15 ms per episode (paper 78): {ms:.1f} ms "
                     f"({best.precision}, {best.strategy}): {'yes' if ms <= 15 else 'no'}")
    one, four = find("Conv-4 MAML 5w1s", "Ray 1 worker", precision="float32"), \
        find("Conv-4 MAML 5w1s", "Ray 4 workers", precision="float32")
    if one and four:
        x = four[0].perf["tasks_per_s"] / one[0].perf["tasks_per_s"]
        lines.append(f"target: Conv-4 MAML, 4 workers sharing the GPU >= 1.5x one worker's tasks/s: {x:.2f}x: "
                     f"{'yes' if x >= 1.5 else 'no (see the compute and overhead columns for why)'}")
    resnet = [r for r in rows if r.perf and r.utilization is not None and "ResNet-12" in r.workload.label]
    if resnet and cuda:
        best = max(resnet, key=lambda r: r.utilization)
        lines.append(f"target: GPU utilization >= 80% during ResNet-12 steps: at most {best.utilization:.0f}% "
                     f"({best.workload.label}, {best.setup.label}, {best.precision}, {best.strategy}): "
                     f"{'yes' if best.utilization >= 80 else 'no'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="no GPU: the same rows on the CPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, each code path once, no drill (CI)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole check")
    ap.add_argument("--rows", type=lambda v: v.split(","), default=[],
                    help="comma-separated parts of row names to run (e.g. 'Conv-4,ProtoNet'); default all")
    ap.add_argument("--floor-calls", type=int, default=300, help="empty steps for Ray's floor")
    args = ap.parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("gpu_ray: no CUDA device; pass --cpu to run the same rows on the CPU")
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    os.chdir(ROOT)
    import ray

    from orchestrator.workers.ray_session import shutdown, start_embedded
    from ray_floor import floor_ms

    device = "cuda" if cuda else "cpu"
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: a second thread of the in-process rows would only spin
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20 if cuda else None
    where = torch.cuda.get_device_name(0) if cuda else "CPU only (--cpu)"
    print(f"gpu_ray: torch {torch.__version__}, {where}, {os.cpu_count()} CPUs, ray {ray.__version__}; "
          f"MLflow {'installed' if _installed('mlflow') else 'not installed'} (tracking off){'; --quick' * args.quick}",
          flush=True)
    ok, lines, rows, floor = True, [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start_embedded(max(os.cpu_count() or 1, 8))  # room for 8 CPU workers on a small machine (they share cores)
        try:
            floor = floor_ms(1761, 2, 30 if args.quick else args.floor_calls)["plain"]
            print(f"Ray's floor: 2 empty actor calls per step (θ 1761 floats in, a gradient out): {floor:.2f} ms "
                  f"(Ray up and measured {time.monotonic() - started:.0f} s after the start)", flush=True)
            plan_rows = plan(workloads(stores(folder, args.quick), args.quick), setups(cuda), args.quick)
            for row in plan_rows:
                if args.rows and not any(part in row.name.replace("-", " ") or part in row.name for part in args.rows):
                    continue
                if time.monotonic() - started > args.budget - (10 if args.quick else 25):
                    row.error = "skipped (time budget)"
                    rows.append(row)
                    continue
                began = time.monotonic()
                train(row, folder, device)
                rows.append(row)
                status = row.error or ", ".join(f"{k} {v:.2f}" for k, v in row.perf.items())
                print(f"  ran ({time.monotonic() - began:.0f} s): {row.name}: {status}", flush=True)
            ok, lines = checks(rows)
        finally:
            shutdown()
        print(f"\nmetaray train on {where}, tracking off; medians after the first tenth of each run's steps; "
              "overhead = step - compute (the slowest share's); GPU % sampled during the steps")
        print(*table(rows, total_mb), sep="\n")
        if floor is not None:
            print(f"Ray's floor on this machine: {floor:.2f} ms per step (2 empty calls)")
        print(*lines, sep="\n")
        print(*(targets(rows, floor, cuda) if cuda else ["targets: for a run on a GPU"]), sep="\n")
    skipped = [r.name for r in rows if r.error.startswith("skipped")]
    if skipped:
        print(f"skipped (time budget; run them with --rows): {', '.join(skipped)}")
    failed = [r.name for r in rows if r.error and not r.error.startswith("skipped")]
    print(f"MLflow imported by these runs: {'yes' if 'mlflow' in sys.modules else 'no'}")
    print(f"\ngpu_ray: {'passed' if ok and not failed else 'FAILED'} in {time.monotonic() - started:.0f} s"
          f"{'; failed runs: ' + ', '.join(failed) if failed else ''}")
    return 0 if ok and not failed else 1


def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
