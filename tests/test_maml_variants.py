"""Meta-SGD, the MAML++ options, iMAML and checkpointed second-order MAML against independent oracles:
float64 finite differences, hand-written autograd, a closed-form implicit gradient, the plain path, Ray."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from conftest import flat, tiny_config
from learners.algorithms.imaml import IMAML
from learners.algorithms.maml import MAML
from learners.inner_loop import adaptation_curves
from learners.inner_update import NORM, RATE, InnerUpdate, norm_keys
from learners.models.conv4 import Conv4
from learners.models.mlp import MLP
from learners.objective import MSE, CrossEntropy
from orchestrator.build import build_algorithm
from orchestrator.config import ConfigError, load_config
from orchestrator.run.central_learner import CentralLearner
from orchestrator.workers.group import LocalGroup
from orchestrator.workers.ray_group import WorkerGroup
from orchestrator.workers.worker import TaskWorker
from tasks.episode import EpisodeBatch, EpisodeIds
from tasks.sine import SineTasks

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(hidden=(4, 4), inputs=1):
    with torch.device("meta"):
        return MLP(inputs, list(hidden), 1)


def conv4():
    with torch.device("meta"):
        return Conv4(1, 16, 5, width=4)


def sine_batch(tasks=3, k=5, q=6, seed=0):
    return SineTasks(k_shot=k, query=q).sample(EpisodeIds(seed, 0, tuple(range(tasks)))).to("cpu", torch.float64)


def image_batch(tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(5)
    return EpisodeBatch(torch.rand(tasks, 5, 1, 16, 16, generator=g, dtype=torch.float64), labels.repeat(tasks, 1),
                        torch.rand(tasks, 10, 1, 16, 16, generator=g, dtype=torch.float64),
                        labels.repeat(2).repeat(tasks, 1))


def with_random_rates(params, seed=0, low=0.02, high=0.12):
    """Learned rates that differ entry by entry, so a test sees which rate each entry of φ used."""
    g = torch.Generator().manual_seed(seed)
    return {k: (low + (high - low) * torch.rand(v.shape, generator=g, dtype=torch.float64)) if k.startswith(RATE)
            else v.to(torch.float64) for k, v in params.items()}


def oracle_loss(model, loss_fn, params, batch, steps, rate, weights=None, norms=()):
    """Σ_tasks Σ_s w_s L_query(φ_s), written out with torch.autograd: φ_{s+1} = φ_s − rate(k, s) ∇_k L_support(φ_s).
    ``norms``: model keys whose value at step s is params['step_norm.' + k][s] and which the inner loop leaves."""
    total = 0
    for i in range(len(batch)):
        phi = {k: v for k, v in params.items() if not k.startswith((RATE, NORM))}
        for s in range(steps):
            phi = {**phi, **{k: params[NORM + k][s] for k in norms}}
            moved = [k for k in phi if k not in norms]
            loss = loss_fn(functional_call(model, phi, (batch.support_x[i],)), batch.support_y[i])
            g = torch.autograd.grad(loss, [phi[k] for k in moved], create_graph=True)
            phi = {**phi, **{k: phi[k] - rate(k, s) * gk for k, gk in zip(moved, g)}}
            w = weights[s] if weights else float(s == steps - 1)
            if w:
                total = total + w * loss_fn(functional_call(model, phi, (batch.query_x[i],)), batch.query_y[i])
    return total


def central_differences(f, params, names, eps=1e-6):
    """d f / d params[name][j] for every entry of each name, by central differences in float64."""
    out = {}
    for name in names:
        value = params[name]
        fd = torch.empty(value.numel(), dtype=torch.float64)
        for j in range(value.numel()):
            def at(delta):
                shifted = value.clone().reshape(-1)
                shifted[j] += delta
                return float(f({**params, name: shifted.view_as(value)}))
            fd[j] = (at(eps) - at(-eps)) / (2 * eps)
        out[name] = fd.view_as(value)
    return out


def leaves(params):
    return {k: v.clone().requires_grad_() for k, v in params.items()}


def test_metasgd_rate_gradients_match_central_finite_differences():
    model = mlp((3, 3))
    alg = MAML(model, MSE(), 1, 0.05, update=InnerUpdate(0.05, "per_parameter"))
    params = with_random_rates(alg.init_params(3))
    rates = [k for k in params if k.startswith(RATE)]
    assert {k.removeprefix(RATE) for k in rates} == {k for k, _ in model.named_parameters()}
    assert all(params[k].shape == params[k.removeprefix(RATE)].shape for k in rates)
    batch = sine_batch()
    got = alg.meta_gradient(params, batch).grads

    def f(p):
        return oracle_loss(model, MSE().loss, leaves(p), batch, 1, lambda k, s: p[RATE + k]).detach()

    fd = central_differences(f, params, rates)
    for k in rates:
        torch.testing.assert_close(got[k], fd[k], rtol=1e-5, atol=1e-8)
        assert got[k].abs().max() > 1e-4  # the rates do get a gradient
    # θ's own gradient against the oracle's autograd.
    lv = leaves(params)
    oracle = dict(zip(lv, torch.autograd.grad(oracle_loss(model, MSE().loss, lv, batch, 1, lambda k, s: lv[RATE + k]),
                                              list(lv.values()))))
    for k in params:
        torch.testing.assert_close(got[k], oracle[k], rtol=1e-10, atol=1e-12)


def test_lslr_rate_gradients_match_central_finite_differences():
    model = mlp()
    alg = MAML(model, MSE(), 2, 0.05, update=InnerUpdate(0.05, "per_layer_per_step", 2))
    params = with_random_rates(alg.init_params(1))
    rates = [k for k in params if k.startswith(RATE)]
    assert len(rates) == 6 and all(params[k].shape == (2,) for k in rates)
    batch = sine_batch()
    got = alg.meta_gradient(params, batch).grads

    def f(p):
        return oracle_loss(model, MSE().loss, leaves(p), batch, 2, lambda k, s: p[RATE + k][s]).detach()

    fd = central_differences(f, params, rates)
    for k in rates:
        torch.testing.assert_close(got[k], fd[k], rtol=1e-5, atol=1e-8)
        assert (got[k].abs() > 1e-5).all()  # each step's rate is used


def test_multi_step_loss_equals_hand_written_weighted_sum_and_anneals_to_the_last_step():
    model = mlp()
    alg = MAML(model, MSE(), 3, 0.05, multi_step_until=100)
    params = {k: v.double() for k, v in alg.init_params(2).items()}
    batch = sine_batch()
    # MAML++'s weights written out for 3 steps: uniform at the start; halfway, the earlier steps have
    # (1 - 0.5)/3 and the last (1 + 2 * 0.5)/3; near the end the earlier ones sit on the floor 0.03/3.
    for step, weights in [(0, (1 / 3, 1 / 3, 1 / 3)), (50, (1 / 6, 1 / 6, 2 / 3)), (99, (0.01, 0.01, 0.98))]:
        configured = alg.for_step(step)
        assert configured.loss_weights == pytest.approx(weights)
        lv = leaves(params)
        total = oracle_loss(model, MSE().loss, lv, batch, 3, lambda k, s: 0.05, weights=weights)
        oracle = dict(zip(lv, torch.autograd.grad(total, list(lv.values()))))
        got = configured.meta_gradient(params, batch)
        for k in params:
            torch.testing.assert_close(got.grads[k], oracle[k], rtol=1e-10, atol=1e-12)
    assert alg.loss_weights is None  # for_step returned copies
    # After the annealing only the last step's loss counts: plain MAML.
    last = alg.for_step(100)
    assert last.loss_weights is None
    plain = MAML(model, MSE(), 3, 0.05).meta_gradient(params, batch).grads
    assert all(torch.equal(last.meta_gradient(params, batch).grads[k], plain[k]) for k in params)


def test_derivative_order_annealing_is_first_order_then_second_order():
    model = mlp()
    alg = MAML(model, MSE(), 2, 0.05, first_order_until=3)
    params = {k: v.double() for k, v in alg.init_params(0).items()}
    batch = sine_batch()
    first = MAML(model, MSE(), 2, 0.05, first_order=True).meta_gradient(params, batch).grads
    second = MAML(model, MSE(), 2, 0.05).meta_gradient(params, batch).grads
    early, late = alg.for_step(2).meta_gradient(params, batch).grads, alg.for_step(3).meta_gradient(params, batch).grads
    assert all(torch.equal(early[k], first[k]) and torch.equal(late[k], second[k]) for k in params)
    assert any(not torch.allclose(first[k], second[k]) for k in params)


def test_per_step_batch_norm_parameters_match_hand_written_autograd():
    model = conv4()
    norms = norm_keys(model)
    assert len(norms) == 8
    alg = MAML(model, CrossEntropy(), 2, 0.1, strategy="loop",
               update=InnerUpdate(0.1, "per_layer_per_step", 2, step_norms=norms))
    params = with_random_rates(alg.init_params(0))
    g = torch.Generator().manual_seed(5)
    params.update({NORM + k: params[NORM + k] + 0.1 * torch.randn(params[NORM + k].shape, generator=g,
                                                                   dtype=torch.float64) for k in norms})
    assert not set(norms) & set(params) and all(params[NORM + k].shape == (2, 4) for k in norms)
    assert alg.tunable(params) == tuple(k for k, _ in model.named_parameters() if k not in norms)
    batch = image_batch()
    lv = leaves(params)
    total = oracle_loss(model, CrossEntropy().loss, lv, batch, 2, lambda k, s: lv[RATE + k][s], norms=norms)
    oracle = dict(zip(lv, torch.autograd.grad(total, list(lv.values()))))
    got = alg.meta_gradient(params, batch).grads
    for k in params:
        torch.testing.assert_close(got[k], oracle[k], rtol=1e-8, atol=1e-10)
    for k in norms:  # both steps' sets are used: set 0 for the first step, set 1 for the second and the query
        assert (got[NORM + k].abs().sum(1) > 0).all()


def linear_task(g, n, d):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def exact_implicit_gradient(theta, batch, lam):
    """Linear regression with MSE: L(p) = |A p − y|²/n with A = [x, 1], so H = 2AᵀA/n, the regularized optimum is
    p* = (H + λI)⁻¹(λθ + 2Aᵀy/n), and the meta-gradient is (I + H/λ)⁻¹ ∇L_query(p*). Summed over tasks."""
    total = torch.zeros_like(theta)
    for i in range(len(batch)):
        a = torch.cat([batch.support_x[i], torch.ones(len(batch.support_x[i]), 1, dtype=torch.float64)], 1)
        aq = torch.cat([batch.query_x[i], torch.ones(len(batch.query_x[i]), 1, dtype=torch.float64)], 1)
        n, nq = len(a), len(aq)
        h = 2 * a.T @ a / n
        eye = torch.eye(len(theta), dtype=torch.float64)
        p = torch.linalg.solve(h + lam * eye, lam * theta + 2 * a.T @ batch.support_y[i][:, 0] / n)
        g = 2 * aq.T @ (aq @ p - batch.query_y[i][:, 0]) / nq
        total += torch.linalg.solve(eye + h / lam, g)
    return total


def test_imaml_matches_the_closed_form_implicit_gradient_and_more_cg_steps_get_closer():
    d, lam = 4, 1.0
    model = mlp(hidden=(), inputs=d)
    g = torch.Generator().manual_seed(0)
    tasks = [linear_task(g, 12, d) + linear_task(g, 8, d) for _ in range(3)]
    batch = EpisodeBatch(*[torch.stack([t[j] for t in tasks]) for j in range(4)])
    params = {k: v.double() for k, v in IMAML(model, MSE()).init_params(0).items()}
    theta = torch.cat([params["0.weight"].reshape(-1), params["0.bias"]])
    exact = exact_implicit_gradient(theta, batch, lam)
    errors = []
    for cg_steps in (1, 2, 3, 5):
        alg = IMAML(model, MSE(), inner_steps=300, inner_lr=0.1, lam=lam, cg_steps=cg_steps)
        grads = alg.meta_gradient(params, batch).grads
        got = torch.cat([grads["0.weight"].reshape(-1), grads["0.bias"]])
        errors.append(float((got - exact).norm() / exact.norm()))
    assert errors[-1] <= 1e-4, errors  # 5 parameters: CG is exact after 5 steps
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3  # one CG step is visibly not the answer: the test can tell them apart


def test_imaml_pullback_and_damping_match_the_authors_update_in_closed_form():
    """``inner: pullback`` with ``cg_damping``, ``lam_damping`` (imaml_dev's Omniglot code): k plain GD steps from
    θ, one step of lr on λ/2 |p − θ|², then ((1 + cd) I + H / (λ + ld))⁻¹ ∇L_query(p). For linear regression every
    step is a matrix product and H = 2AᵀA/n, so the whole meta-gradient is a closed form."""
    d, lam, lr, steps, cd, ld = 4, 2.0, 0.05, 7, 1.0, 10.0
    model = mlp(hidden=(), inputs=d)
    g = torch.Generator().manual_seed(1)
    tasks = [linear_task(g, 12, d) + linear_task(g, 8, d) for _ in range(3)]
    batch = EpisodeBatch(*[torch.stack([t[j] for t in tasks]) for j in range(4)])
    params = {k: v.double() for k, v in IMAML(model, MSE()).init_params(0).items()}
    theta = torch.cat([params["0.weight"].reshape(-1), params["0.bias"]])
    expected = torch.zeros_like(theta)
    eye = torch.eye(len(theta), dtype=torch.float64)
    for i in range(len(batch)):
        a = torch.cat([batch.support_x[i], torch.ones(12, 1, dtype=torch.float64)], 1)
        aq = torch.cat([batch.query_x[i], torch.ones(8, 1, dtype=torch.float64)], 1)
        h = 2 * a.T @ a / 12
        p = theta.clone()
        for _ in range(steps):
            p = p - lr * 2 * a.T @ (a @ p - batch.support_y[i][:, 0]) / 12
        p = p - lr * lam * (p - theta)
        grad_q = 2 * aq.T @ (aq @ p - batch.query_y[i][:, 0]) / 8
        expected += torch.linalg.solve((1 + cd) * eye + h / (lam + ld), grad_q)
    alg = IMAML(model, MSE(), inner_steps=steps, inner_lr=lr, lam=lam, cg_steps=5, inner="pullback",
                cg_damping=cd, lam_damping=ld)
    grads = alg.meta_gradient(params, batch).grads
    got = torch.cat([grads["0.weight"].reshape(-1), grads["0.bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # Evaluation adapts with plain SGD (the authors' test script: λ = 0), not with the proximal pull.
    assert alg.update.proximal == 0.0 and IMAML(model, MSE(), lam=lam).update.proximal == lam


@pytest.mark.parametrize("case", ["mlp", "conv4-mamlpp"])
def test_checkpointed_second_order_equals_plain(case):
    if case == "mlp":
        model, objective, batch = mlp((8, 8)), MSE(), sine_batch().to("cpu", torch.float32)
        alg = MAML(model, objective, 4, 0.05, strategy="loop")
    else:
        model, objective, batch = conv4(), CrossEntropy(), image_batch().to("cpu", torch.float32)
        alg = MAML(model, objective, 3, 0.1, strategy="loop", loss_weights=(0.2, 0.3, 0.5),
                   update=InnerUpdate(0.1, "per_layer_per_step", 3, step_norms=norm_keys(model)))
    params = alg.init_params(0)
    plain = alg.meta_gradient(params, batch)
    ckpt = dataclasses.replace(alg, checkpoint_inner=True).meta_gradient(params, batch)
    rel = float((flat(ckpt.grads) - flat(plain.grads)).norm() / flat(plain.grads).norm())
    assert rel <= 1e-6, rel
    assert ckpt.stats == pytest.approx(plain.stats, rel=1e-6)


def test_checkpointing_recomputes_inner_steps_in_the_backward_pass():
    class Counting(MSE):
        calls = 0

        def loss(self, pred, y):
            Counting.calls += 1
            return super().loss(pred, y)

    alg = MAML(mlp(), Counting(), 4, 0.05, strategy="loop")
    params = alg.init_params(0)
    batch = sine_batch(tasks=1).to("cpu", torch.float32)
    counts = []
    for checkpointed in (False, True):
        Counting.calls = 0
        dataclasses.replace(alg, checkpoint_inner=checkpointed).meta_gradient(params, batch)
        counts.append(Counting.calls)
    # Plain: 4 support losses + 1 query loss (+2 for the statistics). Checkpointed: each of the 4 steps and the
    # query loss runs again in the backward pass, because their activations were not kept (a step's twice: the
    # double backward reaches its saved tensors from two places).
    assert counts[0] == 7 and counts[1] >= counts[0] + 5, counts


@pytest.mark.parametrize("name", ["metasgd", "lslr", "imaml"])
def test_vmap_equals_loop_and_non_finite_tasks_are_dropped(name):
    model = mlp()
    alg = {"metasgd": MAML(model, MSE(), 2, 0.05, update=InnerUpdate(0.05, "per_parameter")),
           "lslr": MAML(model, MSE(), 2, 0.05, update=InnerUpdate(0.05, "per_layer_per_step", 2)),
           "imaml": IMAML(model, MSE(), inner_steps=3, inner_lr=0.05, lam=1.0, cg_steps=3)}[name]
    params = with_random_rates(alg.init_params(0))
    batch = sine_batch(tasks=4)
    vm = dataclasses.replace(alg, strategy="vmap").meta_gradient(params, batch)
    lp = dataclasses.replace(alg, strategy="loop").meta_gradient(params, batch)
    for k in params:
        torch.testing.assert_close(vm.grads[k], lp.grads[k], rtol=1e-10, atol=1e-12)
    poisoned = EpisodeBatch(batch.support_x, batch.support_y.clone(), batch.query_x, batch.query_y)
    poisoned.support_y[1, 0] = float("inf")
    for strategy in ("vmap", "loop"):
        out = dataclasses.replace(alg, strategy=strategy).meta_gradient(params, poisoned)
        assert (out.tasks, out.dropped) == (3, 1)
        assert torch.isfinite(flat(out.grads)).all()


def test_evaluation_adapts_with_the_learned_rates():
    model = mlp()
    alg = MAML(model, MSE(), 1, 0.05, update=InnerUpdate(0.05, "per_parameter"))
    params = with_random_rates(alg.init_params(0))
    batch = sine_batch(tasks=2)
    curves = adaptation_curves(alg, params, batch, steps=1, lr=0.05)
    for i in range(2):
        phi = leaves({k: v for k, v in params.items() if not k.startswith(RATE)})
        loss = MSE().loss(functional_call(model, phi, (batch.support_x[i],)), batch.support_y[i])
        g = torch.autograd.grad(loss, list(phi.values()))
        adapted = {k: phi[k] - params[RATE + k] * gk for k, gk in zip(phi, g)}
        expected = MSE().loss(functional_call(model, adapted, (batch.query_x[i],)), batch.query_y[i])
        torch.testing.assert_close(curves["loss"][i, 1], expected.detach(), rtol=1e-10, atol=1e-12)
    plain = adaptation_curves(MAML(model, MSE(), 1, 0.05), params, batch, steps=1, lr=0.05)
    assert not torch.allclose(plain["loss"][:, 1], curves["loss"][:, 1])


@pytest.mark.parametrize("sets, key", [
    (["algorithm.name=metasgd", "eval.inner_lr=0.1"], "eval.inner_lr"),
    (["algorithm.lslr=true", "eval.inner_lr=0.1"], "eval.inner_lr"),
    (["algorithm.per_step_bn=true"], "algorithm.per_step_bn"),
    (["algorithm.checkpoint_inner=true", "algorithm.strategy=vmap"], "algorithm.strategy"),
    (["algorithm.name=imaml", "algorithm.lam=0"], "algorithm.lam"),
])
def test_bad_settings_name_their_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "sine-maml.yaml", sets)


def test_worker_configures_the_algorithm_for_each_meta_step(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"name": "maml", "inner_steps": 2, "first_order_steps": 2})
    worker = TaskWorker(cfg.model_dump(mode="json"), 0)
    alg = build_algorithm(cfg)
    theta = flat(alg.init_params(0)).numpy()
    params = worker._params(theta)
    for step in (1, 2):
        ids = EpisodeIds(0, step, (0, 1, 2))
        batch = worker._source("train").sample(ids)
        got = torch.from_numpy(worker.meta_gradient(theta, ids).grad)
        expected = flat(alg.for_step(step).meta_gradient(params, batch).grads)
        torch.testing.assert_close(got, expected)
        other = flat(alg.for_step(3 - step).meta_gradient(params, batch).grads)
        assert not torch.allclose(got, other)  # first order at step 1, second order at step 2


ALGORITHMS = {
    "metasgd": {"name": "metasgd", "inner_steps": 1, "inner_lr": 0.01},
    "mamlpp": {"name": "maml", "inner_steps": 2, "inner_lr": 0.01, "lslr": True, "multi_step_loss": 2,
               "first_order_steps": 1},
    "imaml": {"name": "imaml", "inner_steps": 3, "inner_lr": 0.01, "lam": 1.0, "cg_steps": 2},
}


@pytest.mark.usefixtures("ray_local")
# One algorithm in CI (the path is the same for all); every one with -m slow.
@pytest.mark.parametrize("name", [n if n == "metasgd" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ALGORITHMS)])
def test_ray_two_workers_equal_in_process(name, tmp_path):
    def run(cfg, group):
        try:
            learner = CentralLearner(cfg, build_algorithm(cfg).init_params(cfg.run.seed), group)
            for _ in range(2):  # first order, then second order (mamlpp); both with multi-step weights
                learner.meta_step()
            return flat(learner.params)
        finally:
            if isinstance(group, WorkerGroup):
                group.close()

    local_cfg = tiny_config(tmp_path, algorithm=ALGORITHMS[name], workers={"mode": "inprocess", "num_workers": 1})
    ray_cfg = tiny_config(tmp_path, algorithm=ALGORITHMS[name], workers={"mode": "ray", "num_workers": 2})
    expected = run(local_cfg, LocalGroup(local_cfg))
    got = run(ray_cfg, WorkerGroup(ray_cfg))
    assert not torch.equal(expected, flat(build_algorithm(ray_cfg).init_params(0)))  # it trained
    rel = float((got - expected).norm() / expected.norm())
    assert rel <= 1e-6, rel
    assert math.isfinite(rel)
