"""Where config meets data (orchestrator.build): per-split episode shapes, augmentation for training only,
within-group episodes, and data errors that name their config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.params import ParamSpec
from orchestrator.build import build_algorithm, build_tasks, check_tasks
from orchestrator.config import ConfigError, parse_config
from orchestrator.workers.worker import TaskWorker
from tasks.episode import EpisodeIds, Purpose
from tasks.store import DataError
from tasks.store_writer import StoreWriter

SHAPE = (1, 16, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 alphabets a0..a3 of 4 characters, 6 drawings each: train a0-a2 (12 classes), test a3 (4 classes)."""
    path = tmp_path_factory.mktemp("store") / "s.arrow"
    rng = np.random.default_rng(0)
    with StoreWriter(path, SHAPE, source="test", preprocessing="random") as w:
        for c in range(16):
            w.add_class(f"a{c // 4}/c{c % 4}", f"a{c // 4}", rng.integers(0, 256, (6, *SHAPE), dtype=np.uint8))
    return path


def config(store, task=None, algorithm=None):
    return parse_config({
        "task": {"family": "images", "store": str(store), "n_way": 3, "k_shot": 1, "query": 2,
                 "split": {"by": "group", "train": ["a0", "a1", "a2"], "test": ["a3"]}, **(task or {})},
        "model": {"backbone": "conv4", "width": 4},
        "algorithm": algorithm or {"name": "protonet"},
        "outer": {"meta_batch_size": 2},
        "workers": {"mode": "inprocess", "num_workers": 1},
    })


def shapes(batch):
    return tuple(batch.support_x.shape[:2]), tuple(batch.query_x.shape[:2]), int(batch.support_y.max()) + 1


def test_training_episodes_take_their_own_shape_and_evaluation_the_tasks(store):
    cfg = config(store, {"train": {"n_way": 6, "k_shot": 2, "query": 3}})
    ids = EpisodeIds(0, 0, (0, 1))
    assert shapes(build_tasks(cfg.task, "train").sample(ids)) == ((2, 12), (2, 18), 6)
    for split in ("eval", "test"):
        assert shapes(build_tasks(cfg.task, split).sample(ids)) == ((2, 3), (2, 6), 3)
    partial = config(store, {"train": {"k_shot": 4}})
    assert shapes(build_tasks(partial.task, "train").sample(ids)) == ((2, 12), (2, 6), 3)
    check_tasks(cfg)


def test_a_head_written_from_the_support_set_trains_at_one_n_way_and_evaluates_at_another(store):
    cfg = config(store, {"train": {"n_way": 6}})
    check_tasks(cfg)
    worker = TaskWorker(cfg.model_dump(mode="json"), index=0)
    theta = ParamSpec.of(worker.algorithm.init_params(0)).flatten(worker.algorithm.init_params(0)).numpy()
    result = worker.meta_gradient(theta, EpisodeIds(0, 0, (0, 1)))
    assert result.tasks == 2 and np.isfinite(result.grad).all() and np.abs(result.grad).sum() > 0
    scores = worker.evaluate(theta, EpisodeIds(0, 0, (0, 1, 2), Purpose.EVAL), steps=0, lr=0.1)
    assert scores.curves and all(v.shape[0] == 3 for v in scores.curves.values())


def test_an_algorithm_with_a_head_in_theta_must_train_at_the_evaluation_n_way(store):
    maml = {"name": "maml", "inner_steps": 1}
    with pytest.raises(ConfigError, match=r"^task\.train\.n_way: 6 differs from task\.n_way=3, but maml meta-learns "
                                          r"an n_way-sized head \(head\.weight is \[3, 4\] for evaluation\); "
                                          r"train with task\.n_way, or use an algorithm that writes its head from "
                                          r"each support set$"):
        check_tasks(config(store, {"train": {"n_way": 6}}, maml))
    check_tasks(config(store, {"train": {"n_way": 3, "k_shot": 2}}, maml))
    assert ParamSpec.of(build_algorithm(config(store, {}, maml), "train").init_params(0)).numel > 0


def test_augmentation_changes_training_pixels_and_is_off_at_evaluation_unless_asked(store):
    augment = {"crop_padding": 2, "flip": True, "affine": {"degrees": 10.0}}
    plain, augmented = config(store), config(store, {"augment": augment})
    ids = EpisodeIds(3, 1, (0, 1, 2))
    eval_ids = EpisodeIds(3, 0, (0, 1, 2), Purpose.EVAL)
    a, b = build_tasks(plain.task, "train").sample(ids), build_tasks(augmented.task, "train").sample(ids)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_x, b.support_x)
    assert not torch.equal(a.query_x, b.query_x)
    assert float((a.support_x - b.support_x).abs().mean()) > 0.05
    for split in ("eval", "test"):
        e1, e2 = build_tasks(plain.task, split).sample(eval_ids), build_tasks(augmented.task, split).sample(eval_ids)
        assert torch.equal(e1.support_x, e2.support_x) and torch.equal(e1.query_x, e2.query_x)
    asked = config(store, {"augment": {**augment, "at_eval": True, "support": False}})
    e3 = build_tasks(asked.task, "eval").sample(eval_ids)
    e1 = build_tasks(plain.task, "eval").sample(eval_ids)
    assert torch.equal(e3.support_x, e1.support_x) and not torch.equal(e3.query_x, e1.query_x)


def test_within_group_from_the_config_for_both_or_for_evaluation_only(store):
    def groups(tasks, split_ids):
        return [len({tasks.store.groups[c] for c, _ in tasks.episode_classes(split_ids, i)}) for i in split_ids.indices]

    ids = EpisodeIds(0, 0, tuple(range(20)))
    both = config(store, {"within_group": True})
    assert set(groups(build_tasks(both.task, "train"), ids)) == {1}
    assert set(groups(build_tasks(both.task, "eval"), ids)) == {1}
    eval_only = config(store, {"within_group": True, "train": {"within_group": False}})
    assert max(groups(build_tasks(eval_only.task, "train"), ids)) > 1
    with pytest.raises(DataError, match=r"task\.n_way: 5 classes from one group, but the largest group of the train "
                                        r"split \('a0'\) has 4 classes; lower it or set task\.within_group: false"):
        check_tasks(config(store, {"within_group": True, "n_way": 5}))


def test_data_errors_name_the_key_and_the_split_all_in_one_line(store, tmp_path):
    with pytest.raises(DataError) as e:
        check_tasks(config(store, {"n_way": 5, "train": {"query": 6}}))
    assert str(e.value) == (
        "task.k_shot + task.train.query: 1 + 6 = 7 images per class, but class 'a0/c0' of the train split has only 6; "
        "lower them, or leave that class out of the split; task.n_way: 5 is more than the 4 classes of the test "
        "split; lower it or give the split more classes")
    with pytest.raises(DataError, match=r"^task\.store: image store .*missing\.arrow does not exist; create one"):
        check_tasks(config(tmp_path / "missing.arrow"))
    with pytest.raises(DataError, match=r"^task\.split\.train: unknown group names \['zz'\]"):
        check_tasks(config(store, {"split": {"by": "group", "train": ["zz"], "test": ["a3"]}}))
    with pytest.raises(DataError, match=r"^task\.split: group 'a3' is listed in both train and test"):
        check_tasks(config(store, {"split": {"by": "group", "train": ["a3"], "test": ["a3"]}}))


def test_a_store_with_altered_pixels_does_not_train(store, tmp_path):
    from orchestrator import train

    data = bytearray(store.read_bytes())
    from tasks.store import ImageStore

    opened = ImageStore.open(store)
    for c in range(12):  # every training class altered: the first step reads one of them
        data[opened.images(c).ctypes.data - opened._whole.address + 7] ^= 0x10
    (tmp_path / "altered.arrow").write_bytes(bytes(data))
    cfg = parse_config({**config(tmp_path / "altered.arrow").model_dump(mode="json"),
                        "run": {"name": "altered", "dir": str(tmp_path / "runs")}, "outer": {"steps": 2},
                        "tracking": {"enabled": False}})
    with pytest.raises(DataError, match=r"altered\.arrow is corrupt: the pixels of class 'a\d/c\d' do not match"):
        train(cfg, evaluate=False)
    assert not (tmp_path / "runs" / "altered" / "checkpoint.pt").exists()
