"""Learner numerics against independent oracles: finite differences, hand-written autograd, per-task loops."""

import math

import pytest
import torch

from conftest import assert_directional_derivative
from learners.algorithms.finetune import Transfer
from learners.algorithms.hypernet import HyperNetwork
from learners.algorithms.maml import MAML
from learners.algorithms.reptile import Reptile
from learners.inner_loop import adaptation_curves
from learners.models.mlp import MLP
from learners.objective import MSE
from tasks.episode import EpisodeIds
from tasks.sine import SineTasks


def tiny_mlp() -> MLP:
    with torch.device("meta"):
        return MLP(1, [4, 4], 1)


def sine_batch(tasks=3, k=5, q=6, dtype=torch.float64, seed=0):
    return SineTasks(k_shot=k, query=q).sample(EpisodeIds(seed, 0, tuple(range(tasks)))).to("cpu", dtype)


def as64(params):
    return {k: v.to(torch.float64) for k, v in params.items()}


def total_query_loss(alg, params, batch):
    """Oracle objective: sum over tasks of the query loss after the inner loop, written independently."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(batch)):
        p = dict(params)
        for _ in range(alg.inner_steps):
            loss = MSE().loss(alg.predict(p, batch.support_x[i]), batch.support_y[i])
            keys = alg.inner_keys or tuple(p)
            g = torch.autograd.grad(loss, [p[k] for k in keys], create_graph=True)
            p = {**p, **{k: p[k] - alg.inner_lr * gk for k, gk in zip(keys, g)}}
        total = total + MSE().loss(alg.predict(p, batch.query_x[i]), batch.query_y[i])
    return total


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_maml_meta_gradient_matches_central_finite_differences(inner_steps):
    alg = MAML(tiny_mlp(), MSE(), inner_steps=inner_steps, inner_lr=0.1)
    params = as64(alg.init_params(3))
    batch = sine_batch()
    grads = alg.meta_gradient(params, batch).grads
    eps = 1e-6
    for name, value in params.items():
        for j in range(value.numel()):
            def f(delta):
                shifted = value.clone().reshape(-1)
                shifted[j] += delta
                leaves = {k: v.clone().requires_grad_() for k, v in {**params, name: shifted.view_as(value)}.items()}
                return float(total_query_loss(alg, leaves, batch).detach())
            fd = (f(eps) - f(-eps)) / (2 * eps)
            got = float(grads[name].reshape(-1)[j])
            assert math.isclose(got, fd, rel_tol=1e-5, abs_tol=1e-7), (name, j, got, fd)


def test_maml_matches_hand_written_second_order_autograd():
    alg = MAML(tiny_mlp(), MSE(), inner_steps=2, inner_lr=0.05)
    params = {k: v.requires_grad_() for k, v in as64(alg.init_params(1)).items()}
    batch = sine_batch(tasks=4)
    oracle = torch.autograd.grad(total_query_loss(alg, params, batch), list(params.values()))
    got = alg.meta_gradient({k: v.detach() for k, v in params.items()}, batch).grads
    for (name, g_oracle) in zip(params, oracle):
        torch.testing.assert_close(got[name], g_oracle, rtol=1e-10, atol=1e-12)


def test_fomaml_equals_maml_with_detached_inner_gradient():
    model = tiny_mlp()
    fo = MAML(model, MSE(), inner_steps=2, inner_lr=0.05, first_order=True)
    params = as64(fo.init_params(2))
    batch = sine_batch(tasks=4)
    # Oracle: MAML's inner loop with torch.autograd and the inner gradient detached.
    leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = 0
    for i in range(len(batch)):
        p = dict(leaf)
        for _ in range(2):
            loss = MSE().loss(fo.predict(p, batch.support_x[i]), batch.support_y[i])
            g = torch.autograd.grad(loss, list(p.values()))
            p = {k: p[k] - 0.05 * gk.detach() for k, gk in zip(p, g)}
        total = total + MSE().loss(fo.predict(p, batch.query_x[i]), batch.query_y[i])
    oracle = dict(zip(leaf, torch.autograd.grad(total, list(leaf.values()))))
    got = fo.meta_gradient(params, batch).grads
    for k in params:
        torch.testing.assert_close(got[k], oracle[k], rtol=1e-10, atol=1e-12)
    # ...and it is not second-order MAML.
    so = MAML(model, MSE(), inner_steps=2, inner_lr=0.05).meta_gradient(params, batch).grads
    assert any(not torch.allclose(so[k], got[k]) for k in params)


def test_reptile_returns_theta_minus_phi():
    alg = Reptile(tiny_mlp(), MSE(), inner_steps=3, inner_lr=0.05)
    params = as64(alg.init_params(5))
    batch = sine_batch(tasks=3)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(batch)):
        phi = {k: v.clone().requires_grad_() for k, v in params.items()}
        for _ in range(3):
            loss = MSE().loss(alg.predict(phi, batch.support_x[i]), batch.support_y[i])
            g = torch.autograd.grad(loss, list(phi.values()))
            phi = {k: (phi[k] - 0.05 * gk).detach().requires_grad_() for k, gk in zip(phi, g)}
        for k in params:
            expected[k] += params[k] - phi[k].detach()
    got = alg.meta_gradient(params, batch).grads
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)


def test_anil_adapts_only_the_head():
    model = tiny_mlp()
    alg = MAML(model, MSE(), inner_steps=1, inner_lr=0.1, inner_keys=model.head_keys)
    params = as64(alg.init_params(0))
    b = sine_batch(tasks=1)
    fast = alg.adapt(params, b.support_x[0], b.support_y[0])
    for k in params:
        changed = not torch.equal(fast[k], params[k])
        assert changed == (k in model.head_keys), k
    # The body still receives a meta-gradient (through the head's adaptation and the query loss).
    grads = alg.meta_gradient(params, b).grads
    assert float(grads["0.weight"].abs().sum()) > 0


def test_hypernetwork_gradient_matches_finite_differences():
    alg = HyperNetwork(tiny_mlp(), MSE(), in_features=2, width=8)
    params = as64(alg.init_params(0))
    params = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
              for k, v in params.items()}  # move off the zero-initialized decoder output
    batch = sine_batch(tasks=2)
    grads = alg.meta_gradient(params, batch).grads

    def loss(p):
        with torch.no_grad():
            return sum(float(MSE().loss(alg.predict(alg.adapt(p, batch.support_x[i], batch.support_y[i]), batch.query_x[i]),
                                        batch.query_y[i])) for i in range(len(batch)))

    assert_directional_derivative(loss, params, grads, seed=2, rel_tol=1e-6)


ALGORITHMS = {
    "maml": lambda m: MAML(m, MSE(), inner_steps=2, inner_lr=0.05),
    "fomaml": lambda m: MAML(m, MSE(), inner_steps=2, inner_lr=0.05, first_order=True),
    "anil": lambda m: MAML(m, MSE(), inner_steps=2, inner_lr=0.05, inner_keys=m.head_keys),
    "reptile": lambda m: Reptile(m, MSE(), inner_steps=3, inner_lr=0.05),
    "transfer": lambda m: Transfer(m, MSE()),
    "hypernet": lambda m: HyperNetwork(m, MSE(), in_features=2, width=8),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_strategy_equals_loop_strategy(name):
    alg = ALGORITHMS[name](tiny_mlp())
    params = alg.init_params(0)
    batch = sine_batch(tasks=6, dtype=torch.float32)
    alg.strategy = "vmap"
    v = alg.meta_gradient(params, batch)
    ev = adaptation_curves(alg, params, batch, 3, 0.05)
    alg.strategy = "loop"
    lp = alg.meta_gradient(params, batch)
    el = adaptation_curves(alg, params, batch, 3, 0.05)
    assert v.tasks == lp.tasks == 6
    for k in params:
        torch.testing.assert_close(v.grads[k], lp.grads[k], rtol=1e-5, atol=1e-6)
    assert v.stats.keys() == lp.stats.keys()
    for k in v.stats:
        assert math.isclose(v.stats[k], lp.stats[k], rel_tol=1e-5)
    torch.testing.assert_close(ev["loss"], el["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_task_is_dropped_and_counted(strategy, poison):
    alg = MAML(tiny_mlp(), MSE(), inner_steps=1, inner_lr=0.05, strategy=strategy)
    params = alg.init_params(0)
    batch = sine_batch(tasks=5, dtype=torch.float32)
    poisoned_y = batch.support_y.clone()
    poisoned_y[2, 0, 0] = poison  # task 2's inner loop produces non-finite parameters
    bad = type(batch)(batch.support_x, poisoned_y, batch.query_x, batch.query_y)
    got = alg.meta_gradient(params, bad)
    keep = [0, 1, 3, 4]
    clean = alg.meta_gradient(params, type(batch)(*(t[keep] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))))
    assert (got.tasks, got.dropped) == (4, 1)
    assert got.per_task_finite == [True, True, False, True, True]
    for k in params:
        assert torch.isfinite(got.grads[k]).all()
        torch.testing.assert_close(got.grads[k], clean.grads[k], rtol=1e-5, atol=1e-6)
    assert math.isclose(got.stats["loss_after"], clean.stats["loss_after"], rel_tol=1e-5)


def test_adaptation_lowers_support_loss_and_does_not_mutate_params():
    alg = MAML(tiny_mlp(), MSE(), inner_steps=5, inner_lr=0.05)
    params = alg.init_params(0)
    before = {k: v.clone() for k, v in params.items()}
    b = sine_batch(tasks=1, dtype=torch.float32)
    fast = alg.adapt(params, b.support_x[0], b.support_y[0])
    loss = lambda p: float(MSE().loss(alg.predict(p, b.support_x[0]), b.support_y[0]))
    assert loss(fast) < loss(params)
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_init_is_deterministic_and_seed_dependent():
    alg = MAML(tiny_mlp(), MSE())
    a, b, c = alg.init_params(0), alg.init_params(0), alg.init_params(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    bound = 1 / math.sqrt(4)
    assert float(a["2.weight"].abs().max()) <= bound
