"""One GPU check: CUDA tests, CPU-vs-CUDA parity of every algorithm, the QP solver, and a throughput table.

For a machine with a CUDA GPU and nothing but PyTorch, numpy, pyarrow and pytest: it uses ``learners/``
and ``tasks/`` only (no Ray, MLflow, cvxpylayers, PIL or YAML; no ``orchestrator``). ``learners``
declares each algorithm's config with pydantic; where pydantic is not installed, ``--wheels DIR``
puts the wheels in DIR on the path (pydantic, pydantic-core for the machine's Python, annotated-types,
typing-extensions, typing-inspection; e.g. ``pip download --only-binary=:all: --python-version 3.12
--platform manylinux2014_x86_64 -d DIR pydantic``). Within ``--budget`` seconds (default 270) it

1. runs ``tests/test_cuda.py`` (pytest without the suite's conftest, which needs the orchestrator);
2. checks every registered algorithm's ``meta_gradient`` and ``adapt`` on CUDA against the same call on
   the CPU (float32 without TF32, so the two differ by rounding only);
3. solves a batch of SVM duals with the batched QP on CUDA and on the CPU (float64);
4. prints one table of tasks/s (per-task strategy vmap vs loop, eager vs compiled, float32 vs bfloat16
   autocast) for sine MAML, Conv-4 MAML and ProtoNet on generated Omniglot-format data (28x28), and
   ResNet-12 ProtoNet / MetaOptNet-RR / MetaOptNet-SVM at 84x84 (5-way, 15 queries per class), with
   ms per episode next to MetaOptNet's Table 3 (Lee et al. 2019, ResNet-12 on miniImageNet: ProtoNet
   60/66, RR 68/75, SVM 78/89 ms per episode, 1-/5-shot), and the peak GPU memory of each row;
5. times what a Ray worker would get per share on the GPU: θ in from the host, episodes drawn on the CPU
   and moved in one copy, the meta-gradient, the gradient back to the host;
6. measures the CUDA speed options one by one and together against full float32 (no TF32, NCHW, no cuDNN
   benchmark): TF32 for matmuls and convolutions, channels-last images, ``cudnn.benchmark``, bfloat16
   autocast; tasks/s and how far each one's meta-gradient is from full float32's, and the fastest float32
   setting within ``TF32_TOLERANCE`` per backbone: what ``CUDA_DEFAULTS`` in ``orchestrator/build.py``
   should say (``model.tf32``, ``model.channels_last``, ``model.cudnn_benchmark``; ``auto`` reads it).

Head-only learners (ProtoNet, MetaOptNet) are timed with the ``onepass`` strategy too (one backbone pass
for all of a call's tasks). ``--options`` applies speed options to the throughput table, e.g.
``--options channels_last,cudnn_benchmark``.

``--ray`` runs instead the Ray check of ``benchmarks/gpu_ray.py``: real ``metaray train`` runs with Ray workers
sharing the GPU (its docstring has the one-call command for the GPU machine).

Without a GPU it runs what it can on the CPU (the QP and the table, much smaller with ``--quick``) and
says what it skipped. Exit status 1 when a test or a parity check fails.

    python benchmarks/gpu_check.py [--wheels shared/wheels]     # ~4 minutes on one H100
    python benchmarks/gpu_check.py --quick                        # seconds; what tests/test_gpu_check.py runs
    python benchmarks/gpu_check.py --ray [--cpu] [--quick]       # benchmarks/gpu_ray.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# AUTO_STRATEGY's CUDA entries in orchestrator/build.py, written out: this check runs without the orchestrator.
CUDA_STRATEGY = {"mlp": "vmap", "conv4": "vmap", "resnet12": "loop"}
SPEED_OPTIONS = ("tf32", "channels_last", "cudnn_benchmark", "bf16")
TF32_TOLERANCE = 1e-2  # relative distance of a float32 setting's meta-gradient from full float32's it may have
BF16_TOLERANCE = 0.2  # bfloat16 autocast's stated tolerance (tests/test_hot_path.py)
PAPER_MS = {("protonet", 1): 60, ("protonet", 5): 66, ("metaoptnet-ridge", 1): 68, ("metaoptnet-ridge", 5): 75,
            ("metaoptnet-svm", 1): 78, ("metaoptnet-svm", 5): 89}


def ensure_pydantic(wheels: str | None) -> str:
    """Make ``import pydantic`` work: as installed, or from the wheels in ``wheels`` (unpacked to a temp folder
    put first on sys.path). Returns where it came from."""
    try:
        import pydantic  # noqa: F401
        return "installed"
    except ImportError:
        if not wheels or not any(Path(wheels).glob("*.whl")):
            raise SystemExit("pydantic is not installed (learners/ needs it): pass --wheels DIR with its wheels, "
                             "see this script's docstring") from None
    target = tempfile.mkdtemp(prefix="gpu_check_wheels_")
    for wheel in sorted(Path(wheels).glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    import pydantic  # noqa: F401,F811
    return f"wheels from {wheels}"


class Budget:
    """Seconds left for the whole check; a part that would not fit is skipped and says so."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """What a worker with model.precision bfloat16 runs the meta-gradient under."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def speed(options: frozenset[str]):
    """torch's switches as a worker sets them for ``options`` (model.tf32, model.cudnn_benchmark; channels-last
    is the batch's layout, ``EpisodeBatch.channels_last``), restored after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in options
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in options
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


# -- workloads ----------------------------------------------------------------------------------------------

def generated_store(folder: Path, shape: tuple[int, int, int], classes: int, per_class: int, seed: int) -> str:
    """An image store in the Omniglot layout (groups of characters), random strokes, written with StoreWriter."""
    from tasks.store_writer import StoreWriter

    dest = folder / f"generated-{shape[0]}x{shape[1]}-{classes}x{per_class}-seed{seed}.arrow"
    if dest.exists():  # the same arguments wrote the same store: the table and the worker rows share it
        return str(dest)
    rng = np.random.default_rng(seed)
    with StoreWriter(dest, shape, source="generated", preprocessing="random strokes") as w:
        for c in range(classes):
            pixels = ((rng.random((per_class, *shape)) > 0.8) * 255).astype(np.uint8)
            w.add_class(f"Alphabet{c % 4}/character{c:03d}", f"Alphabet{c % 4}", pixels)
    return str(dest)


@dataclass
class Workload:
    """A model, its task source and an algorithm config: what one row group of the table measures."""

    label: str
    algorithm: str
    family: str  # sine | images
    tasks: int  # per meta-step
    knobs: dict[str, Any]
    shape: tuple[int, int, int] = (1, 28, 28)
    backbone: str = "mlp"
    n_way: int = 5
    k_shot: int = 1
    query: int = 15
    store: str | None = None
    width: int | None = None  # narrower backbones for --quick (None: Conv-4's 64, ResNet-12's 64-160-320-640)

    def parts(self, strategy: str):
        from learners.models.classifier import Classifier
        from learners.models.conv4 import Conv4
        from learners.models.mlp import MLP
        from learners.models.resnet12 import ResNet12
        from learners.objective import MSE, CrossEntropy
        from learners.registry import Parts

        with torch.device("meta"):
            if self.family == "sine":
                return Parts(MLP(1, [40, 40], 1), MSE(), 1, None, strategy)
            c, h, _ = self.shape
            if self.backbone == "resnet12":
                w = self.width
                net = ResNet12(c) if w is None else ResNet12(c, (w, 2 * w, 4 * w, 8 * w))
                model = Classifier(net, net.out_features(self.shape), self.n_way)
            else:
                model = Conv4(c, h, self.n_way, self.width or 64)
        # train_classes: what a pre-training classifier (pretrain) is over; an episode's labels are among them
        return Parts(model, CrossEntropy(), c * h * h, self.n_way, strategy, train_classes=self.n_way)

    def build(self, strategy: str, compile: bool = False):
        from learners.registry import variant

        knobs = {**self.knobs, **({"compile": True} if compile else {})}
        return variant(self.algorithm)(name=self.algorithm, **knobs).build(self.parts(strategy))

    def source(self):
        from tasks.fewshot import FewShotTasks
        from tasks.sine import SineTasks
        from tasks.store import ImageStore

        if self.family == "sine":
            return SineTasks(k_shot=10, query=10)
        store = ImageStore.open(self.store)
        return FewShotTasks(store, self.n_way, self.k_shot, self.query, range(store.num_classes))


def workloads(quick: bool, folder: Path) -> list[Workload]:
    if quick:  # tiny shapes: the code paths of the full check, in seconds on a CPU
        small = generated_store(folder, (1, 28, 28), 12, 6, 0)
        tiny = generated_store(folder, (3, 16, 16), 8, 4, 1)
        return [
            Workload("sine MAML", "maml", "sine", 4, {"inner_steps": 1, "inner_lr": 0.01}),
            Workload("Conv-4 MAML 5w1s", "maml", "images", 2, {"inner_steps": 1, "inner_lr": 0.4}, store=small,
                     backbone="conv4", query=1, width=16),
            Workload("Conv-4 ProtoNet 5w1s", "protonet", "images", 2, {}, store=small, backbone="conv4", query=1,
                     width=16),
            Workload("ResNet-12 SVM 5w1s", "metaoptnet-svm", "images", 1, {}, (3, 16, 16), "resnet12", store=tiny,
                     query=1, width=16),
        ]
    omniglot = generated_store(folder, (1, 28, 28), 40, 20, 0)
    mini = generated_store(folder, (3, 84, 84), 20, 20, 1)
    rows = [
        Workload("sine MAML", "maml", "sine", 25, {"inner_steps": 1, "inner_lr": 0.01}),
        Workload("Conv-4 MAML 5w1s", "maml", "images", 32, {"inner_steps": 1, "inner_lr": 0.4}, store=omniglot,
                 backbone="conv4"),
        Workload("Conv-4 ProtoNet 5w1s", "protonet", "images", 32, {}, store=omniglot, backbone="conv4"),
    ]
    for name, label in (("protonet", "ProtoNet"), ("metaoptnet-ridge", "RR"), ("metaoptnet-svm", "SVM")):
        for shot in (1, 5):
            rows.append(Workload(f"ResNet-12 {label} 5w{shot}s", name, "images", 8, {}, (3, 84, 84), "resnet12",
                                 k_shot=shot, store=mini))
    return rows


# -- timing -------------------------------------------------------------------------------------------------

def time_steps(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ``steps`` after ``warmup`` more)."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def compute_cell(w: Workload, device: torch.device, strategy: str, compiled: bool, bf16: bool, steps: int,
                 warmup: int, options: frozenset[str] = frozenset(), keep: list | None = None) -> tuple[float, float]:
    """(tasks/s of the meta-gradient with the episodes already on the device, first-call seconds); the last
    call's summed gradient is appended to ``keep`` if given."""
    from tasks.episode import EpisodeIds

    alg = w.build(strategy, compile=compiled)
    params = {k: v.to(device) for k, v in alg.init_params(0).items()}
    batch = w.source().sample(EpisodeIds(0, 0, tuple(range(w.tasks)))).to(device)
    if "channels_last" in options and w.family != "sine":
        batch = batch.channels_last()
    last = []

    def step():
        with precision(device, bf16 or "bf16" in options):
            last[:] = [alg.meta_gradient(params, batch)]
        return last[0]

    with speed(options):
        first, seconds = time_steps(step, device, steps, warmup)
    if keep is not None:
        keep.append(last[0].grads)
    return w.tasks / seconds, first


def worker_cell(w: Workload, device: torch.device, strategy: str, steps: int, warmup: int) -> float:
    """tasks/s of a Ray worker's call on the GPU: θ from host bytes, episodes sampled and moved, gradient back."""
    from learners.params import ParamSpec
    from tasks.episode import EpisodeIds

    alg = w.build(strategy)
    theta = np.concatenate([v.reshape(-1).numpy() for v in alg.init_params(0).values()]).astype(np.float32)
    spec = ParamSpec.of(alg.init_params(0))
    source = w.source()
    counter = iter(range(10**9))

    def call():
        params = spec.unflatten(torch.tensor(theta, device=device))
        batch = source.sample(EpisodeIds(0, next(counter), tuple(range(w.tasks)))).to(device)
        summed = alg.meta_gradient(params, batch)
        return spec.flatten(summed.grads).detach().to("cpu", torch.float32).numpy()

    _, seconds = time_steps(call, device, steps, warmup)
    return w.tasks / seconds


# -- checks -------------------------------------------------------------------------------------------------

def run_cuda_tests(cuda: bool, quick: bool) -> tuple[bool, str]:
    if not cuda or quick:
        return True, f"CUDA tests: skipped ({'no CUDA device' if not cuda else '--quick'})"
    cmd = [sys.executable, "-m", "pytest", "--noconftest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return done.returncode == 0, f"CUDA tests (tests/test_cuda.py): {tail}"


def parity(cuda: bool, folder: Path) -> tuple[bool, list[str]]:
    """Every registered algorithm's meta_gradient and adapt, CUDA vs CPU."""
    from learners.registry import variants
    from tasks.episode import EpisodeIds

    if not cuda:
        return True, ["parity CPU vs CUDA: skipped (no CUDA device)"]
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    store = generated_store(folder, (1, 28, 28), 10, 6, 7)
    ok, lines = True, []
    for name, config in variants().items():
        family = "sine" if "sine" in config.families else "images"
        # An algorithm that pre-trains on global labels centres test embeddings by the training images' mean,
        # which needs a training split: compared here without centring.
        knobs = {"center": False} if config(name=name).minibatch() is not None else {}
        w = Workload(name, name, family, 3, knobs, store=store, backbone="conv4", query=2)
        alg = w.build("vmap" if family == "sine" else "loop")
        params = alg.init_params(0)
        batch = w.source().sample(EpisodeIds(0, 0, (0, 1, 2)))
        cpu = alg.meta_gradient(params, batch)
        gpu = alg.meta_gradient({k: v.cuda() for k, v in params.items()}, batch.to("cuda"))
        g_rel = _rel(gpu.grads, cpu.grads)
        s_rel = max((abs(gpu.stats[k] - v) / max(abs(v), 1e-6) for k, v in cpu.stats.items()), default=0.0)
        a_cpu = alg.adapt(params, batch.support_x[0], batch.support_y[0])
        a_gpu = alg.adapt({k: v.cuda() for k, v in params.items()}, batch.support_x[0].cuda(),
                          batch.support_y[0].cuda())
        a_rel = _rel(a_gpu, a_cpu)
        good = cpu.tasks == gpu.tasks and max(g_rel, s_rel, a_rel) < 1e-3
        ok &= good
        lines.append(f"  {name:<18} meta_gradient rel {g_rel:.1e}  stats rel {s_rel:.1e}  adapt rel {a_rel:.1e}  "
                     f"{'ok' if good else 'FAILED'}")
    return ok, ["parity CPU vs CUDA (float32, TF32 off; each relative difference < 1e-3):", *lines]


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].detach().double().cpu() - b[k].detach().double()).norm() ** 2) for k in b)
    den = sum(float(b[k].detach().double().norm() ** 2) for k in b)
    return math.sqrt(num / max(den, 1e-30))


def qp_check(device: torch.device, quick: bool) -> list[str]:
    """The batched SVM dual on ``device`` against the CPU: solution difference and time."""
    from learners.heads.svm_head import svm_dual

    tasks, dim = (2, 64) if quick else (32, 16000)
    g = torch.Generator().manual_seed(0)
    support = torch.randn(tasks, 25, dim, generator=g).relu()
    labels = torch.arange(5).repeat_interleave(5).repeat(tasks, 1)
    cpu = svm_dual(support, labels, 5)
    if device.type != "cuda":
        return [f"QP: {tasks} SVM duals (5-way 5-shot, D={dim}) on the CPU: {int(cpu.ok.sum())}/{tasks} solved; "
                "CUDA skipped (no CUDA device)"]
    s, y = support.cuda(), labels.cuda()
    _, seconds = time_steps(lambda: svm_dual(s, y, 5), device, 5, 1)
    gpu = svm_dual(s, y, 5)
    rel = float((gpu.x.cpu().double() - cpu.x.double()).norm() / cpu.x.double().norm())
    return [f"QP: {tasks} SVM duals (5-way 5-shot, D={dim}) on CUDA: {int(gpu.ok.sum())}/{tasks} solved, "
            f"{seconds * 1e3:.2f} ms, solution vs CPU rel {rel:.1e}"]


# -- the table ----------------------------------------------------------------------------------------------

def head_only(w: Workload) -> bool:
    """Whether ``w``'s algorithm runs the onepass strategy (one backbone pass for all tasks)."""
    from learners.registry import variant

    return w.family != "sine" and variant(w.algorithm)(name=w.algorithm, **w.knobs).one_pass()


def cells(w: Workload, quick: bool) -> list[tuple[str, bool]]:
    """(strategy, bfloat16) pairs measured for ``w``: every strategy in both precisions, or with --quick each
    code path once."""
    strategies = ("vmap", "loop", "onepass") if head_only(w) else ("vmap", "loop")
    if not quick:
        return [(s, b) for s in strategies for b in (False, True)]
    usual = "vmap" if w.family == "sine" else "loop"
    return ([(usual, False)] + ([("vmap", True)] if w.backbone != "resnet12" else [])
            + ([("onepass", False)] if head_only(w) else []))


def table(device: torch.device, quick: bool, folder: Path, budget: Budget, steps: int,
          rows: list[str], options: frozenset[str] = frozenset()) -> list[str]:
    out = [f"{'workload':<24}{'strategy':<9}{'precision':<10}{'eager tasks/s':>14}{'compiled':>10}"
           f"{'ms/episode':>11}{'paper':>7}{'peak MB':>9}"]
    skipped: list[str] = []
    notes: list[str] = []
    warmup = 0 if quick else 2
    for w in workloads(quick, folder):
        if rows and not any(r in w.label for r in rows):
            continue
        for strategy, bf16 in cells(w, quick):
            if budget.left() < (5 if quick else 20):
                skipped.append(f"{w.label} {strategy} {'bf16' if bf16 else 'fp32'} (time budget)")
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                eager, _ = compute_cell(w, device, strategy, False, bf16, steps, warmup, options)
            except Exception as e:  # noqa: BLE001 - one failed cell must not hide the rest of the table
                out.append(f"{w.label:<24}{strategy:<9}{'bf16' if bf16 else 'fp32':<10}  failed: "
                           f"{type(e).__name__}: {str(e)[:80]}")
                continue
            compiled = "-"
            # Compilation takes minutes on a CPU: the compiled column is for the small models on a GPU.
            if w.backbone != "resnet12" and strategy == "vmap" and not bf16 and not quick:
                if device.type == "cuda" and budget.left() > 90:
                    try:
                        rate, first = compute_cell(w, device, strategy, True, bf16, steps, warmup)
                        compiled = f"{rate:.0f}"
                        notes.append(f"compiled {w.label}: first call {first:.1f} s (compilation included)")
                    except Exception as e:  # noqa: BLE001 - torch.compile's own failures are a finding, not a crash
                        compiled = "failed"
                        notes.append(f"compiled {w.label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                else:
                    skipped.append(f"{w.label} compiled ({'time budget' if device.type == 'cuda' else 'CPU'})")
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
            paper = PAPER_MS.get((w.algorithm, w.k_shot)) if w.backbone == "resnet12" else None
            out.append(f"{w.label:<24}{strategy:<9}{'bf16' if bf16 else 'fp32':<10}{eager:>14.1f}{compiled:>10}"
                       f"{1e3 / eager:>11.1f}{paper if paper else '':>7}{peak:>9}")
            print(f"  measured: {out[-1]}", flush=True)  # the table is printed again at the end; this survives a crash
    return out + [f"note: {n}" for n in notes] + [f"skipped: {s}" for s in skipped]


def option_sets(cuda: bool) -> list[frozenset[str]]:
    """Full float32, each speed option alone, the float32 ones together, and bfloat16 with the layout ones."""
    fp32 = [o for o in SPEED_OPTIONS if o != "bf16"] if cuda else ["channels_last"]  # TF32, cuDNN: CUDA only
    return ([frozenset()] + [frozenset([o]) for o in fp32] + ([frozenset(fp32)] if len(fp32) > 1 else [])
            + [frozenset(["bf16"]), frozenset(["bf16", *[o for o in fp32 if o != "tf32"]])])


def options_table(device: torch.device, quick: bool, folder: Path, budget: Budget, steps: int) -> list[str]:
    """Each speed option against full float32 on the image workloads (their CUDA strategy), and per backbone
    the fastest float32 setting whose meta-gradient is within TF32_TOLERANCE of full float32's."""
    cuda = device.type == "cuda"
    out = [f"{'workload':<24}{'strategy':<9}{'options':<36}{'tasks/s':>9}{'x fp32':>8}{'grad rel':>10}  within"]
    best: dict[str, tuple[float, frozenset[str]]] = {}
    for w in workloads(quick, folder):
        if w.family == "sine" or (quick and w.backbone != "resnet12"):  # --quick: each code path once
            continue
        strategy = CUDA_STRATEGY[w.backbone]
        base_rate, base = None, None
        for options in option_sets(cuda)[:None if cuda or not quick else 3]:
            if budget.left() < (5 if quick else 20):
                out.append(f"{w.label:<24}{strategy:<9}{'+'.join(sorted(options)) or 'fp32':<36}  skipped (budget)")
                continue
            kept: list = []
            try:
                rate, _ = compute_cell(w, device, strategy, False, False, steps, 0 if quick else 2, options, kept)
            except Exception as e:  # noqa: BLE001 - one failed cell must not hide the rest
                out.append(f"{w.label:<24}{strategy:<9}{'+'.join(sorted(options)) or 'fp32':<36}  failed: "
                           f"{type(e).__name__}: {str(e)[:60]}")
                continue
            if not options:
                base_rate, base = rate, kept[0]
            rel = _rel(kept[0], base) if base is not None else float("nan")
            limit = BF16_TOLERANCE if "bf16" in options else TF32_TOLERANCE
            within = rel <= limit
            if within and "bf16" not in options and (w.backbone not in best or rate > best[w.backbone][0]):
                best[w.backbone] = (rate, options)
            speedup = rate / base_rate if base_rate else float("nan")
            out.append(f"{w.label:<24}{strategy:<9}{'+'.join(sorted(options)) or 'fp32 (none)':<36}{rate:>9.1f}"
                       f"{speedup:>8.2f}{rel:>10.1e}  {'yes' if within else 'NO'} (<= {limit:g})")
            print(f"  measured: {out[-1]}", flush=True)
    for backbone, (_, options) in sorted(best.items()):
        setting = {o: o in options for o in SPEED_OPTIONS if o != "bf16"}
        out.append(f"fastest float32 setting within {TF32_TOLERANCE:g} for {backbone}: {setting}"
                   f"{'' if cuda else ' (CPU: TF32 and cuDNN do not apply; CUDA_DEFAULTS are for CUDA)'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, one timed step each (CPU smoke test)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole check")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 5, --quick 1)")
    ap.add_argument("--rows", type=lambda v: v.split(","), default=[],
                    help="comma-separated label parts: table rows to measure, e.g. 'SVM,sine' (default all)")
    ap.add_argument("--wheels", default=str(ROOT / "shared" / "wheels"), help="pydantic's wheels, if not installed")
    ap.add_argument("--options", type=lambda v: frozenset(o for o in v.split(",") if o), default=frozenset(),
                    help=f"speed options for the throughput table: comma-separated of {', '.join(SPEED_OPTIONS)}")
    ap.add_argument("--ray", action="store_true", help="the Ray check instead (benchmarks/gpu_ray.py)")
    ap.add_argument("--cpu", action="store_true", help="with --ray: the same rows on the CPU")
    args, rest = ap.parse_known_args()
    if args.ray:
        sys.path.insert(0, str(ROOT))
        from benchmarks.gpu_ray import main as ray_main

        sys.exit(ray_main([*(["--cpu"] if args.cpu else []), *(["--quick"] if args.quick else []),
                           "--budget", str(args.budget), *(["--rows", ",".join(args.rows)] if args.rows else []),
                           *rest]))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    unknown = args.options - set(SPEED_OPTIONS)
    if unknown:
        ap.error(f"--options: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SPEED_OPTIONS)}")
    started = time.monotonic()
    budget = Budget(args.budget)
    source = ensure_pydantic(args.wheels)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (1 if args.quick else 5)
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: a second thread would only spin
    if cuda:
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
    else:
        where = "no CUDA device: CPU only, CUDA parts skipped"
    print(f"gpu_check: torch {torch.__version__}, {where}; {os.cpu_count()} CPUs; pydantic {source}"
          f"{'; --quick' if args.quick else ''}", flush=True)
    passed, line = run_cuda_tests(cuda, args.quick)
    print(line, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        same, lines = parity(cuda, folder)
        print(*lines, sep="\n", flush=True)
        print(*qp_check(device, args.quick), sep="\n", flush=True)
        print(f"\nmeta-gradient throughput on {device.type} (episodes on the device; median of {steps} steps):",
              flush=True)
        print(*table(device, args.quick, folder, budget, steps, args.rows, args.options), sep="\n", flush=True)
        print(f"\nspeed options on {device.type} against full float32 (no TF32, NCHW, no cuDNN benchmark):",
              flush=True)
        print(*options_table(device, args.quick, folder, budget, steps), sep="\n", flush=True)
        if cuda and budget.left() > 20:
            print("\nwhat a Ray worker would get on this GPU (θ in, episodes drawn and moved, gradient out):")
            for w in workloads(args.quick, folder):
                if budget.left() < 10:
                    print(f"  {w.label}: skipped (time budget)")
                    continue
                try:
                    rate = worker_cell(w, device, "vmap", steps, 1)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  {w.label}: failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(f"  {w.label:<24} {rate:>10.1f} tasks/s ({1e3 / rate:.1f} ms per episode)", flush=True)
        else:
            why = "(no CUDA device)" if not cuda else "(time budget)"
            print(f"\nRay worker throughput on the GPU: skipped {why}")
    print(f"\ngpu_check: {'passed' if passed and same else 'FAILED'} in {time.monotonic() - started:.0f} s")
    sys.exit(0 if passed and same else 1)


if __name__ == "__main__":
    main()
