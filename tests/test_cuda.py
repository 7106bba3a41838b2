"""CUDA checks that need neither Ray, MLflow nor the orchestrator (``benchmarks/gpu_check.py`` runs them on a GPU
machine with ``pytest --noconftest``): the GPU gives the CPU's numbers, episodes move in one copy, the per-task
loop does not wait for the device per task, and bfloat16 autocast stays within its stated tolerance."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from learners.algorithms.maml import MAML
from learners.algorithms.protonet import ProtoNet
from learners.heads.svm_head import svm_dual
from learners.models.conv4 import Conv4
from learners.models.mlp import MLP
from learners.objective import MSE, CrossEntropy
from tasks.episode import EpisodeBatch, EpisodeIds, transfer
from tasks.sine import SineTasks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 off: CPU and GPU then differ by float32 rounding only."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def mlp() -> MLP:
    with torch.device("meta"):
        return MLP(1, [40, 40], 1)


def conv4(width: int = 16) -> Conv4:
    with torch.device("meta"):
        return Conv4(1, 28, 5, width)


def images(tasks: int) -> EpisodeBatch:
    g = torch.Generator().manual_seed(0)
    shot, query = torch.arange(5).repeat(tasks, 1), torch.arange(5).repeat_interleave(3).repeat(tasks, 1)
    return EpisodeBatch((torch.rand(tasks, 5, 1, 28, 28, generator=g) > 0.8).float(), shot,
                        (torch.rand(tasks, 15, 1, 28, 28, generator=g) > 0.8).float(), query)


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double().cpu() - b[k].double().cpu()).norm() ** 2) for k in b)
    return math.sqrt(num / sum(float(b[k].double().cpu().norm() ** 2) for k in b))


def on(device: str, params: dict) -> dict:
    return {k: v.to(device) for k, v in params.items()}


def test_a_share_moves_to_the_gpu_in_one_copy_with_its_values_and_dtypes():
    batch = SineTasks().sample(EpisodeIds(0, 0, tuple(range(7))))
    moved = batch.to("cuda")
    tensors = (moved.support_x, moved.support_y, moved.query_x, moved.query_y)
    assert all(t.is_cuda for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    for a, b in zip((batch.support_x, batch.support_y, batch.query_x, batch.query_y), tensors):
        assert torch.equal(a, b.cpu())
    mixed = transfer((torch.arange(5), torch.randn(2, 3)), torch.device("cuda"), pin=True)
    assert mixed[0].dtype == torch.int64 and torch.equal(mixed[0].cpu(), torch.arange(5))


@pytest.mark.parametrize("make, batch", [
    (lambda: MAML(mlp(), MSE(), strategy="vmap"), lambda: SineTasks().sample(EpisodeIds(0, 0, tuple(range(8))))),
    (lambda: MAML(mlp(), MSE(), strategy="loop"), lambda: SineTasks().sample(EpisodeIds(0, 0, tuple(range(8))))),
    (lambda: MAML(conv4(), CrossEntropy(), inner_lr=0.4, strategy="vmap"), lambda: images(3)),
    (lambda: ProtoNet(conv4(), CrossEntropy(), 5, strategy="vmap"), lambda: images(3)),
])
def test_meta_gradient_on_cuda_equals_cpu(make, batch):
    alg, b = make(), batch()
    params = alg.init_params(0)
    cpu, gpu = alg.meta_gradient(params, b), alg.meta_gradient(on("cuda", params), b.to("cuda"))
    assert gpu.tasks == cpu.tasks and rel(gpu.grads, cpu.grads) < 1e-4
    assert all(math.isclose(gpu.stats[k], v, rel_tol=1e-4, abs_tol=1e-6) for k, v in cpu.stats.items())


@pytest.mark.parametrize("make", [lambda: MAML(conv4(8), CrossEntropy(), inner_lr=0.4, strategy="loop"),
                                  lambda: ProtoNet(conv4(8), CrossEntropy(), 5, strategy="loop")])
def test_the_loop_waits_for_the_gpu_once_per_share_not_once_per_task(make):
    alg = make()
    params = on("cuda", alg.init_params(0))

    def syncs(tasks: int) -> int:
        batch = images(tasks).to("cuda")
        alg.meta_gradient(params, batch)  # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                alg.meta_gradient(params, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(2) == syncs(6)


def test_bfloat16_autocast_on_cuda_is_within_the_stated_tolerance():
    # The tolerances of tests/test_hot_path.py: sine MLP MAML within 20% (relative norm), Conv-4 ProtoNet cosine 0.95.
    sine = SineTasks().sample(EpisodeIds(0, 0, tuple(range(8))))
    for alg, batch, bound in [(MAML(mlp(), MSE(), strategy="vmap"), sine, "rel"),
                              (ProtoNet(conv4(), CrossEntropy(), 5, strategy="vmap"), images(3), "cos")]:
        params, b = on("cuda", alg.init_params(0)), batch.to("cuda")
        full = alg.meta_gradient(params, b)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = alg.meta_gradient(params, b)
        assert all(v.dtype == torch.float32 for v in half.grads.values())
        if bound == "rel":
            assert 0 < rel(half.grads, full.grads) <= 0.2
        else:
            x, y = (torch.cat([t[k].double().reshape(-1) for k in sorted(full.grads)])
                    for t in (half.grads, full.grads))
            assert float(x @ y / (x.norm() * y.norm())) >= 0.95


def test_qp_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(8, 25, 640, generator=g).relu()
    labels = torch.arange(5).repeat_interleave(5).repeat(8, 1)
    cpu, gpu = svm_dual(support, labels, 5), svm_dual(support.cuda(), labels.cuda(), 5)
    assert bool(cpu.ok.all()) and bool(gpu.ok.cpu().all())
    assert float((gpu.x.cpu().double() - cpu.x.double()).norm() / cpu.x.double().norm()) < 1e-4
