"""The TaskWorker's own logic, in-process: where it computes, prefetched shares, θ as bytes, mixed precision."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import flat, tiny_config
from orchestrator.workers.messages import theta_message
from orchestrator.workers.worker import TaskWorker, placement
from tasks.episode import EpisodeIds


def test_placement_follows_the_config_and_caps_a_fractional_gpu():
    assert placement("auto", 0.0, True) == ("cpu", None)
    assert placement("auto", 1.0, False) == ("cpu", None)
    assert placement("cpu", 1.0, True) == ("cpu", None)
    assert placement("auto", 1.0, True) == ("cuda", None)
    assert placement("auto", 0.25, True) == ("cuda", 0.25)  # several workers share a GPU: each gets its part
    assert placement("cuda", 2.0, True) == ("cuda", None)
    with pytest.raises(RuntimeError, match="workers.device is cuda but this worker sees no GPU"):
        placement("cuda", 0.5, False)


def worker(tmp_path, **sections) -> TaskWorker:
    return TaskWorker(tiny_config(tmp_path, **sections).model_dump(mode="json"), 0)


def test_a_prefetching_worker_returns_what_a_plain_one_does(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path).model_dump(mode="json")
    fast = TaskWorker(cfg, 0, prefetch=True)
    theta = flat(fast.algorithm.init_params(0)).numpy()
    fast.meta_gradient(theta, EpisodeIds(0, 0, (0, 1, 2)))
    assert fast._next is None  # sine shares are drawn in microseconds: not worth a thread
    monkeypatch.setattr("orchestrator.workers.worker.PREFETCH_MIN_S", 0.0)
    ahead, plain = TaskWorker(cfg, 0, prefetch=True), TaskWorker(cfg, 0)
    theta = flat(ahead.algorithm.init_params(0)).numpy()
    # Step 1 was prefetched after step 0 (same share); then a share it did not guess (the prefetch goes unused).
    for ids in (EpisodeIds(0, 0, (0, 1, 2)), EpisodeIds(0, 1, (0, 1, 2)), EpisodeIds(0, 2, (3, 4))):
        a, b = ahead.meta_gradient(theta, ids), plain.meta_gradient(theta, ids)
        assert np.array_equal(a.grad, b.grad) and a.stats == b.stats and a.tasks == b.tasks == len(ids)
    assert ahead._next is not None and ahead._next[0] == EpisodeIds(0, 3, (3, 4))


def test_theta_as_bytes_gives_the_same_result(tmp_path):
    w = worker(tmp_path)
    theta = flat(w.algorithm.init_params(0)).numpy()
    ids = EpisodeIds(0, 0, (0, 1))
    a, b = w.meta_gradient(theta, ids), w.meta_gradient(theta_message(theta), ids)
    assert isinstance(theta_message(theta), bytes) and np.array_equal(a.grad, b.grad)


def test_bfloat16_precision_runs_the_backbone_under_autocast(tmp_path):
    ids = EpisodeIds(0, 0, tuple(range(8)))
    full = worker(tmp_path / "a", model={"hidden": [40, 40]})
    half = worker(tmp_path / "b", model={"hidden": [40, 40], "precision": "bfloat16"})
    theta = flat(full.algorithm.init_params(0)).numpy()
    a, b = full.meta_gradient(theta, ids), half.meta_gradient(theta, ids)
    assert b.grad.dtype == np.float32
    diff = np.linalg.norm(b.grad - a.grad) / np.linalg.norm(a.grad)
    assert 0 < diff <= 0.2, diff  # the stated tolerance (tests/test_hot_path.py)
    curves = half.evaluate(theta, ids, 1, 0.01)
    assert curves.curves["loss"].dtype == np.float32 and np.isfinite(curves.curves["loss"]).all()


def test_cuda_speed_options_resolve_auto_and_channels_last_keeps_every_value(tmp_path, monkeypatch):
    import torch

    from orchestrator.build import CUDA_DEFAULTS, cuda_options
    from tasks.episode import EpisodeBatch

    cfg = tiny_config(tmp_path, model={"hidden": [16, 16], "tf32": True})
    assert cuda_options(cfg) == {**CUDA_DEFAULTS["mlp"], "tf32": True}  # the others: auto, the measured default
    monkeypatch.setitem(CUDA_DEFAULTS, "mlp", {"tf32": False, "channels_last": True, "cudnn_benchmark": True})
    assert cuda_options(cfg) == {"tf32": True, "channels_last": True, "cudnn_benchmark": True}
    with pytest.raises(Exception, match="model.tf32"):
        tiny_config(tmp_path, model={"tf32": "fast"})
    g = torch.Generator().manual_seed(0)
    b = EpisodeBatch(torch.rand(3, 4, 3, 8, 8, generator=g), torch.arange(4).repeat(3, 1),
                     torch.rand(3, 6, 3, 8, 8, generator=g), torch.arange(6).repeat(3, 1))
    nhwc = b.channels_last()
    assert not b.support_x[0].is_contiguous(memory_format=torch.channels_last)
    assert nhwc.support_x[0].is_contiguous(memory_format=torch.channels_last)
    assert nhwc.query_x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)  # one pass keeps it
    assert all(torch.equal(getattr(b, k), getattr(nhwc, k)) for k in ("support_x", "support_y", "query_x", "query_y"))
