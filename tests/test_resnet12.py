"""ResNet-12 backbone: shapes, deterministic init, functional use (functional_call, vmap)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from learners.heads.svm_head import svm_logits
from learners.models.resnet12 import ResNet12
from learners.params import init_params, materialize

SMALL = (8, 12, 16, 20)  # narrow widths keep the functional tests fast on CPU

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_net(**kwargs) -> ResNet12:
    with torch.device("meta"):
        return ResNet12(**kwargs)


@pytest.mark.parametrize("in_shape,features", [((3, 84, 84), 16000), ((1, 28, 28), 640)])
def test_output_shape_matches_out_features(in_shape, features):
    net = meta_net(in_channels=in_shape[0])
    assert net.out_features(in_shape) == features
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    assert functional_call(net, init_params(net, 0), (x,)).shape == (2, features)


def test_structure_and_deterministic_init():
    net = meta_net()
    assert [b.conv1.out_channels for b in net.blocks] == [64, 160, 320, 640]
    assert not any(True for _ in net.buffers())  # batch norm keeps no running statistics
    a, b, c = init_params(net, 7), init_params(net, 7), init_params(net, 8)
    assert list(a) == [name for name, _ in net.named_parameters()]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.conv1.weight"], c["blocks.0.conv1.weight"])
    assert 12_000_000 < sum(v.numel() for v in a.values()) < 13_000_000  # MetaOptNet's ~12.4M


def test_functional_call_equals_loaded_module():
    net = meta_net(in_channels=1, channels=SMALL)
    params = init_params(net, 3)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    real = materialize(net, params).train()  # batch statistics in both modes: no running stats kept
    torch.testing.assert_close(functional_call(net, params, (x,)), real(x))
    torch.testing.assert_close(real.eval()(x), real.train()(x))


def test_vmap_over_tasks_equals_loop():
    net = meta_net(in_channels=1, channels=SMALL)
    params = init_params(net, 4)
    x = torch.randn(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(2))  # [T, B, C, H, W]
    embed = lambda xi: functional_call(net, params, (xi,))
    torch.testing.assert_close(vmap(embed)(x), torch.stack([embed(xi) for xi in x]))


def test_meta_gradient_through_svm_head_is_finite():
    net = meta_net(in_channels=1, channels=SMALL)
    params = {k: v.requires_grad_() for k, v in init_params(net, 5).items()}
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.randn(2, 5, 1, 28, 28, generator=g), torch.randn(2, 10, 1, 28, 28, generator=g)
    sy, qy = torch.arange(5).repeat(2, 1), torch.arange(5).repeat(2, 2)
    embed = lambda xi: functional_call(net, params, (xi,))
    logits, ok = svm_logits(vmap(embed)(sx), sy, vmap(embed)(qx), 5)
    grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), qy.flatten()), list(params.values()))
    assert ok.all() and all(gr.isfinite().all() for gr in grads) and grads[0].abs().sum() > 0


def test_bad_input_is_named():
    net = meta_net(in_channels=3)
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        functional_call(net, init_params(net, 0), (torch.zeros(2, 1, 28, 28),))
    with pytest.raises(ValueError, match="too small for 4 max-pools"):
        net.out_features((3, 8, 8))
    with pytest.raises(ValueError, match="channels must be 4 positive widths"):
        ResNet12(channels=(64, 160))
