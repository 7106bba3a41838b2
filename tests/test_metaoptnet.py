"""MetaOptNet as an algorithm: fast solver == cvxpylayers through the whole meta-gradient, finite differences,
dropped non-converged tasks, and Ray == in-process on a real image store."""

import math

import pytest
import torch
from test_image_learners import separable_batch

from conftest import assert_directional_derivative, flat, tiny_config
from learners.algorithms.metaoptnet import MetaOptNet
from learners.inner_loop import adaptation_curves
from learners.models.conv4 import Conv4
from learners.objective import CrossEntropy


def tiny(head="svm", **kw):
    with torch.device("meta"):
        model = Conv4(1, 16, 5, width=4)
    return MetaOptNet(model, CrossEntropy(), n_way=5, head=head, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("shots", [1, 2])
def test_fast_solver_equals_cvxpylayers_through_the_meta_gradient(shots):
    params = tiny().init_params(0)
    batch = separable_batch(3, k=shots, seed=shots)
    fast = tiny(solver="fast").meta_gradient(params, batch)
    ref = tiny(solver="cvxpylayers").meta_gradient(params, batch)
    assert fast.tasks == ref.tasks == 3
    assert rel(flat(fast.grads), flat(ref.grads)) < 1e-4
    scale = float(flat(ref.grads).norm())
    for k in params:  # entry-wise, up to 1e-4 of the whole gradient (conv biases before batch norm are ~0)
        torch.testing.assert_close(fast.grads[k], ref.grads[k], rtol=1e-4, atol=1e-4 * scale)
    assert math.isclose(fast.stats["loss_after"], ref.stats["loss_after"], rel_tol=1e-5)


@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_meta_gradient_matches_finite_differences_in_float64(head):
    alg = tiny(head)
    params = {k: v.double() + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
              for k, v in alg.init_params(0).items()}
    batch = separable_batch(2, seed=3).to("cpu", torch.float64)
    grads = alg.meta_gradient(params, batch).grads

    def loss(p):
        with torch.no_grad():
            return _total_loss(alg, p, batch)

    assert_directional_derivative(loss, params, grads, seed=11, rel_tol=1e-5)


def _total_loss(alg, params, batch):
    """Oracle: the summed query cross-entropy, computed task by task through ``start`` (the solved head)."""
    alg.eval_iters = 100  # converge fully, like the training solve (whose tolerance is reached in < 15 steps)
    total = 0.0
    for i in range(len(batch)):
        task = alg.start(params, batch.support_x[i], batch.support_y[i])
        total += float(CrossEntropy().loss(alg.predict(task, batch.query_x[i]), batch.query_y[i]))
    return total


def test_non_converged_tasks_are_dropped_and_counted():
    alg = tiny(train_iters=1)
    params = alg.init_params(0)
    summed = alg.meta_gradient(params, separable_batch(3))
    assert summed.dropped == 3 and summed.tasks == 0
    assert all(float(g.abs().sum()) == 0 for g in summed.grads.values())


def test_loop_and_vmap_embeddings_agree_and_evaluation_uses_the_solved_head():
    batch = separable_batch(3)
    a, b = tiny(strategy="loop"), tiny(strategy="vmap")
    params = a.init_params(0)
    ga, gb = a.meta_gradient(params, batch), b.meta_gradient(params, batch)
    assert rel(flat(ga.grads), flat(gb.grads)) < 1e-4
    curve = adaptation_curves(a, params, batch, 1, 0.1)
    assert math.isclose(float(curve["acc"][:, 0].sum()), ga.stats["acc_after"], rel_tol=1e-6)


@pytest.mark.parametrize("name", ["metaoptnet-svm", pytest.param("metaoptnet-ridge", marks=pytest.mark.slow)])
def test_ray_equals_in_process_on_a_real_store(tmp_path, ray_local, name):
    from image_layouts import omniglot_folder

    from orchestrator.build import build_algorithm
    from orchestrator.run.central_learner import CentralLearner
    from orchestrator.workers.group import LocalGroup
    from orchestrator.workers.ray_group import WorkerGroup
    from tasks.converters.omniglot import convert_omniglot

    convert_omniglot([omniglot_folder(tmp_path / "src", {"A": 5, "B": 5}, drawings=4)], tmp_path / "s.arrow",
                     size=16)

    def cfg(mode):
        return tiny_config(tmp_path / mode, task={"family": "images", "store": str(tmp_path / "s.arrow"), "n_way": 3,
                                                  "k_shot": 1, "query": 2, "split": {"by": "class", "train": 0.6,
                                                                                     "test": 0.4}},
                           model={"backbone": "conv4", "width": 4}, algorithm={"name": name},
                           outer={"meta_batch_size": 4, "steps": 3}, workers={"mode": mode, "num_workers": 2})

    thetas = []
    for c, make in ((cfg("inprocess"), LocalGroup), (cfg("ray"), WorkerGroup)):
        group = make(c)
        try:
            learner = CentralLearner(c, build_algorithm(c).init_params(0), group)
            for _ in range(3):
                learner.meta_step()
        finally:
            group.close()
        thetas.append(flat(learner.params))
    assert rel(thetas[1], thetas[0]) <= 1e-6
