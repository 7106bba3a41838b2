"""Conv-4 and ProtoNet numerics, and a real check that gradients flow through Conv-4 with batch norm."""

import math

import pytest
import torch

from conftest import assert_directional_derivative
from learners.algorithms.maml import MAML
from learners.algorithms.protonet import ProtoNet, prototype_head
from learners.models.conv4 import Conv4
from learners.objective import CrossEntropy
from tasks.episode import EpisodeBatch


def conv4(n_way=5, size=16, width=8, channels=1):
    with torch.device("meta"):
        return Conv4(channels, size, n_way, width=width)


def separable_batch(tasks, n_way=5, k=1, q=3, size=16, seed=0, pool=12):
    """Episodes over a pool of fixed random class patterns (plus noise): learnable, separable, shuffled labels."""
    g = torch.Generator().manual_seed(1000)
    patterns = (torch.rand(pool, 1, size, size, generator=g) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    sx, sy, qx, qy = [], [], [], []
    for _ in range(tasks):
        classes = torch.randperm(pool, generator=g)[:n_way]
        def draw(m):
            labels = torch.arange(n_way).repeat(m)
            x = patterns[classes[labels]] + 0.3 * torch.randn(len(labels), 1, size, size, generator=g)
            return x, labels
        a, b = draw(k)
        c, d = draw(q)
        sx.append(a); sy.append(b); qx.append(c); qy.append(d)
    return EpisodeBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))


def test_conv4_feature_sizes_and_head():
    assert conv4(size=28, width=64).embedding_dim == 64
    assert conv4(size=84, width=64).embedding_dim == 1600
    with pytest.raises(ValueError, match="too small for Conv-4"):
        conv4(size=8)


def test_prototype_head_is_nearest_prototype_classification():
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(10, 6, generator=g), torch.arange(5).repeat(2)
    z = torch.randn(7, 6, generator=g)
    w, b = prototype_head(emb, labels, 5)
    protos = torch.stack([emb[labels == c].mean(0) for c in range(5)])
    distances = torch.cdist(z, protos) ** 2
    torch.testing.assert_close(torch.softmax(z @ w.T + b, -1), torch.softmax(-distances, -1), rtol=1e-5, atol=1e-6)


def test_protonet_gradient_matches_finite_differences():
    alg = ProtoNet(conv4(width=4), CrossEntropy(), n_way=5)
    params = {k: v.double() for k, v in alg.init_params(0).items()}
    b = separable_batch(2).to("cpu", torch.float64)
    grads = alg.meta_gradient(params, b).grads

    def loss(p):
        with torch.no_grad():
            return sum(float(CrossEntropy().loss(alg.predict(alg.start(p, b.support_x[i], b.support_y[i]), b.query_x[i]),
                                                 b.query_y[i])) for i in range(len(b)))

    assert_directional_derivative(loss, params, grads, seed=3, rel_tol=1e-6)


@pytest.mark.parametrize("make", [
    lambda m: ProtoNet(m, CrossEntropy(), n_way=5),
    lambda m: MAML(m, CrossEntropy(), inner_steps=1, inner_lr=0.4),
    lambda m: MAML(m, CrossEntropy(), inner_steps=2, inner_lr=0.4, first_order=True),
])
def test_vmap_equals_loop_on_conv4(make):
    alg = make(conv4())
    params = alg.init_params(0)
    b = separable_batch(3)
    alg.strategy = "vmap"
    v = alg.meta_gradient(params, b)
    alg.strategy = "loop"
    lp = alg.meta_gradient(params, b)
    for k in params:
        torch.testing.assert_close(v.grads[k], lp.grads[k], rtol=1e-4, atol=1e-5)
    for k in v.stats:
        assert math.isclose(v.stats[k], lp.stats[k], rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("name, make, lr, steps", [
    ("protonet", lambda m: ProtoNet(m, CrossEntropy(), n_way=5), 3e-3, 40),
    ("maml", lambda m: MAML(m, CrossEntropy(), inner_steps=1, inner_lr=0.4), 1e-2, 40),
    ("fomaml", lambda m: MAML(m, CrossEntropy(), inner_steps=1, inner_lr=0.4, first_order=True), 1e-2, 120),
])
def test_learns_above_chance_through_conv4_with_batch_norm(name, make, lr, steps):
    alg = make(conv4())
    params = {k: v.clone() for k, v in alg.init_params(0).items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    held_out = separable_batch(16, seed=999)

    def query_accuracy():
        return alg.meta_gradient(params, held_out).stats["acc_after"] / len(held_out)

    before = query_accuracy()
    for step in range(steps):
        summed = alg.meta_gradient(params, separable_batch(4, seed=step))
        for k, p in params.items():
            p.grad = summed.grads[k] / summed.tasks
        opt.step()
    after = query_accuracy()
    assert after > 0.6 and after > before + 0.2, (name, before, after)
