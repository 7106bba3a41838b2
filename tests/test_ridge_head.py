"""Ridge-regression head (MetaOptNet-RR / R2D2): Woodbury form against the primal fit, and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from learners.heads.ridge_head import ridge_dual, ridge_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def episode(tasks: int, n_way: int, k_shot: int, n_query: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(tasks, n_way * k_shot, dim, generator=g, dtype=dtype)
    query = torch.randn(tasks, n_query, dim, generator=g, dtype=dtype)
    labels = torch.arange(n_way).repeat_interleave(k_shot).repeat(tasks, 1)
    return support, labels, query


@pytest.mark.parametrize("dim", [3, 40])  # fewer and more features than support points
def test_matches_primal_ridge_regression(dim):
    support, labels, query = episode(3, 5, 2, 7, dim, dim)
    lam = 0.3
    Y = F.one_hot(labels, 5).double()
    # Independent computation: least squares on the augmented system [X; sqrt(lam) I] W = [Y; 0] (D x D primal).
    X_aug = torch.cat([support, lam**0.5 * torch.eye(dim, dtype=torch.float64).expand(3, dim, dim)], 1)
    Y_aug = torch.cat([Y, torch.zeros(3, dim, 5, dtype=torch.float64)], 1)
    W = torch.linalg.lstsq(X_aug, Y_aug).solution
    torch.testing.assert_close(ridge_logits(support, labels, query, 5, lam=lam), query @ W, rtol=1e-9, atol=1e-10)
    W_normal = torch.linalg.solve(support.mT @ support + lam * torch.eye(dim, dtype=torch.float64), support.mT @ Y)
    torch.testing.assert_close(support.mT @ ridge_dual(support, labels, 5, lam), W_normal, rtol=1e-9, atol=1e-10)


def test_gradients_match_finite_differences():
    support, labels, query = episode(2, 3, 2, 4, 5, 1)
    lam = torch.tensor(0.7, dtype=torch.float64)
    query_y = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])

    def loss(s, q, lam):
        return F.cross_entropy(ridge_logits(s, labels, q, 3, lam=lam).flatten(0, 1), query_y.flatten())

    inputs = tuple(t.clone().requires_grad_() for t in (support, query, lam))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_per_task_lambda_equals_separate_calls():
    support, labels, query = episode(2, 5, 1, 3, 8, 2)
    both = ridge_logits(support, labels, query, 5, lam=torch.tensor([0.5, 5.0], dtype=torch.float64))
    first = ridge_logits(support[:1], labels[:1], query[:1], 5, lam=0.5)
    second = ridge_logits(support[1:], labels[1:], query[1:], 5, lam=5.0)
    torch.testing.assert_close(both, torch.cat([first, second]))


def test_per_task_grad_under_vmap_equals_batched_autograd():
    support, labels, query = episode(3, 5, 2, 4, 6, 5)
    query_y = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))

    def task_loss(s, sy, q, qy):
        return F.cross_entropy(ridge_logits(s[None], sy[None], q[None], 5, lam=2.0)[0], qy)

    per_task = vmap(grad(task_loss))(support, labels, query, query_y)
    s = support.clone().requires_grad_()
    logits = ridge_logits(s, labels, query, 5, lam=2.0)
    sum(F.cross_entropy(logits[i], query_y[i]) for i in range(3)).backward()
    torch.testing.assert_close(per_task, s.grad)


def test_float32_and_degenerate_support_stay_finite():
    support, labels, query = episode(2, 5, 5, 6, 1600, 3, torch.float32)
    support[0] = support[0, :1]  # duplicate images
    support[1] = 0.0  # all-zero features
    s = support.requires_grad_()
    logits = ridge_logits(s, labels, query, 5)
    logits.square().sum().backward()
    assert logits.dtype == torch.float32 and logits.isfinite().all() and s.grad.isfinite().all()
    ref = ridge_logits(support.double(), labels, query.double(), 5)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)


def test_bad_lambda_is_named():
    support, labels, query = episode(2, 5, 1, 3, 8, 0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        ridge_logits(support, labels, query, 5, lam=0.0)
    with pytest.raises(ValueError, match=r"one value per task \[2\]"):
        ridge_logits(support, labels, query, 5, lam=torch.ones(3, dtype=torch.float64))
