"""The onepass strategy: one backbone pass for all of a share's tasks equals the per-task loop (gradients, statistics,
dropped tasks), with each task's support and query sets normalized by their own batch-norm statistics."""

import math
from pathlib import Path

import pytest
import torch

from image_layouts import omniglot_folder
from learners.algorithms.maml import MAML
from learners.algorithms.metaoptnet import MetaOptNet
from learners.algorithms.protonet import ProtoNet
from learners.models.classifier import Classifier, embed, embed_sets
from learners.models.norm import per_set_statistics
from learners.models.conv4 import Conv4
from learners.models.resnet12 import ResNet12
from learners.objective import CrossEntropy
from learners.params import init_params
from orchestrator.build import AUTO_HEAD_ONLY, AUTO_STRATEGY, build_algorithm
from orchestrator.config import ConfigError, load_config
from tasks.episode import EpisodeBatch
from test_image_learners import separable_batch

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALGORITHMS = {
    "protonet": lambda m: ProtoNet(m, CrossEntropy(), n_way=5),
    "metaoptnet-svm": lambda m: MetaOptNet(m, CrossEntropy(), 5, head="svm"),
    "metaoptnet-ridge": lambda m: MetaOptNet(m, CrossEntropy(), 5, head="ridge"),
    "anil": lambda m: MAML(m, CrossEntropy(), inner_steps=2, inner_lr=0.4, inner_keys=m.head_keys),
    "anil first order": lambda m: MAML(m, CrossEntropy(), inner_steps=1, inner_lr=0.4, inner_keys=m.head_keys,
                                       first_order=True),
}


def conv4():
    with torch.device("meta"):
        return Conv4(1, 16, 5, width=8)


def resnet12():
    with torch.device("meta"):
        net = ResNet12(1, (4, 6, 8, 10))
        return Classifier(net, net.out_features((1, 16, 16)), 5)


def run(alg, params, batch, strategy, tasks_per_pass=None):
    alg.strategy, alg.tasks_per_pass = strategy, tasks_per_pass
    getattr(alg, "_cache", {}).clear()
    return alg.meta_gradient(params, batch)


def test_one_pass_normalizes_each_set_by_its_own_statistics():
    model = conv4()
    params = init_params(model, 0)
    b = separable_batch(3, k=2, q=3)
    support, query = embed_sets(model, params, b.support_x, b.query_x)
    for i in range(3):
        torch.testing.assert_close(support[i], embed(model, params, b.support_x[i]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(query[i], embed(model, params, b.query_x[i]), rtol=1e-5, atol=1e-5)
    # The same images as one plain batch (shared statistics) give other embeddings: the per-set norm is what
    # makes the pass equal to the per-task path.
    shared = embed(model, params, torch.cat([b.support_x.flatten(0, 1), b.query_x.flatten(0, 1)]))[:30]
    assert (shared - support.flatten(0, 1)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("backbone, dtype, tol", [(conv4, torch.float32, 1e-5), (resnet12, torch.float64, 1e-9)])
def test_one_pass_equals_the_per_task_loop(name, backbone, dtype, tol):
    # Float32 on Conv-4; float64 on ResNet-12, whose batch norm over 10 support images at 1x1 resolution amplifies
    # float32 rounding to ~1e-3 between any two summation orders (vmap against loop alike).
    alg = ALGORITHMS[name](backbone())
    params = {k: v.to(dtype) for k, v in alg.init_params(0).items()}
    b = separable_batch(5, k=2, q=3).to("cpu", dtype)
    loop = run(alg, params, b, "loop")
    for tasks_per_pass in (None, 2):  # the whole share in one pass, and chunks of 2, 2 and 1 tasks
        one = run(alg, params, b, "onepass", tasks_per_pass)
        assert (one.tasks, one.dropped, one.per_task_finite) == (5, 0, [True] * 5)
        for k in params:
            torch.testing.assert_close(one.grads[k], loop.grads[k], rtol=tol, atol=tol * loop.grads[k].abs().max())
        assert one.stats.keys() == loop.stats.keys()
        for k in loop.stats:
            assert math.isclose(one.stats[k], loop.stats[k], rel_tol=tol, abs_tol=tol), (k, one.stats, loop.stats)


@pytest.mark.parametrize("name, where", [(n, w) for n in ALGORITHMS if n != "anil first order"
                                          for w in ("support_x", "query_x")])
def test_one_pass_drops_the_same_non_finite_task(name, where):
    alg = ALGORITHMS[name](conv4())
    params = alg.init_params(0)
    b = separable_batch(5, k=2, q=3)
    tensors = {k: getattr(b, k).clone() for k in ("support_x", "support_y", "query_x", "query_y")}
    tensors[where][2, 0, 0, 0, 0] = float("nan")  # one pixel of task 2
    bad = EpisodeBatch(**tensors)
    clean = run(alg, params, b[[0, 1, 3, 4]], "loop")
    for strategy in ("loop", "onepass"):
        got = run(alg, params, bad, strategy)
        assert (got.tasks, got.dropped, got.per_task_finite) == (4, 1, [True, True, False, True, True]), strategy
        for k in params:
            torch.testing.assert_close(got.grads[k], clean.grads[k], rtol=1e-5, atol=1e-5 * clean.grads[k].abs().max())
        assert math.isclose(got.stats["loss_after"], clean.stats["loss_after"], rel_tol=1e-5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tasks.converters.omniglot import convert_omniglot

    root = tmp_path_factory.mktemp("onepass")
    folder = omniglot_folder(root / "src", {"Greek": 3, "Latin": 3}, drawings=3)
    return str(convert_omniglot([folder], root / "store.arrow", size=16).dest)


def test_config_chooses_and_refuses_onepass(store, monkeypatch):
    def cfg(*sets):
        return load_config(CONFIGS / "omniglot-protonet-5w1s.yaml", [f"task.store={store}", "task.n_way=2",
                                                                    "task.train.n_way=null", *sets])

    # auto: a head-only learner takes AUTO_HEAD_ONLY's entry for (device, backbone), the others AUTO_STRATEGY's
    monkeypatch.setitem(AUTO_HEAD_ONLY, ("cpu", "conv4"), "onepass")
    assert build_algorithm(cfg()).strategy == "onepass"
    assert build_algorithm(cfg("algorithm.name=anil")).strategy == "onepass"
    assert build_algorithm(cfg("algorithm.name=fomaml")).strategy == AUTO_STRATEGY["cpu", "conv4"]
    assert build_algorithm(cfg("algorithm.tasks_per_pass=4")).tasks_per_pass == 4
    monkeypatch.delitem(AUTO_HEAD_ONLY, ("cpu", "conv4"))
    assert build_algorithm(cfg()).strategy == AUTO_STRATEGY["cpu", "conv4"]
    assert build_algorithm(cfg("algorithm.name=anil", "algorithm.strategy=onepass")).strategy == "onepass"
    assert build_algorithm(cfg("algorithm.name=maml")).strategy == "loop"
    with pytest.raises(ConfigError, match="algorithm.strategy: onepass .* maml as configured is not one"):
        cfg("algorithm.name=maml", "algorithm.strategy=onepass")
    with pytest.raises(ConfigError, match="algorithm.strategy: onepass"):
        cfg("algorithm.name=anil", "algorithm.lslr=true", "algorithm.strategy=onepass")
    with pytest.raises(ConfigError, match="algorithm.tasks_per_pass: only the onepass strategy"):
        cfg("algorithm.strategy=loop", "algorithm.tasks_per_pass=2")


def test_one_pass_keeps_channels_last_and_its_numbers():
    # A CUDA worker with model.channels_last lays images out NHWC; the per-set norm must hand the next convolution
    # that layout and change no value.
    with torch.device("meta"):
        model = Conv4(3, 16, 5, width=8)
    params = init_params(model, 0)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(3, 5, 3, 16, 16, generator=g), torch.rand(3, 6, 3, 16, 16, generator=g)
    nhwc = EpisodeBatch(sx, torch.zeros(3, 5, dtype=torch.long), qx, torch.zeros(3, 6, dtype=torch.long)).channels_last()
    layer = model.features[0][1]  # the first block's batch norm, on the first convolution's NHWC output
    conv = torch.nn.functional.conv2d(nhwc.support_x.flatten(0, 1), params["features.0.0.weight"], padding=1)
    with per_set_statistics(((3, 5),)):
        out = torch.func.functional_call(layer, {"weight": params["features.0.1.weight"],
                                                 "bias": params["features.0.1.bias"]}, (conv,))
    assert conv.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(memory_format=torch.channels_last)
    for plain, laid_out in zip(embed_sets(model, params, sx, qx), embed_sets(model, params, nhwc.support_x, nhwc.query_x)):
        torch.testing.assert_close(laid_out, plain, rtol=1e-5, atol=1e-6)
