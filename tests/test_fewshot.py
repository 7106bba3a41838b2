"""Few-shot episodes (FewShotTasks) and class splits (split_classes) over small synthetic stores."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from tasks.episode import EpisodeIds, Purpose
from tasks.fewshot import FewShotTasks
from tasks.splits import split_classes
from tasks.store import DataError, ImageStore
from tasks.store_writer import StoreWriter

SHAPE = (1, 5, 5)


@pytest.fixture
def store(tmp_path) -> ImageStore:
    """12 classes in 4 groups (g0..g3, 3 classes each), 6 random images each (class 11 has 4)."""
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s.arrow", SHAPE, source="test", preprocessing="random") as w:
        for c in range(12):
            w.add_class(f"c{c:02d}", f"g{c // 3}", rng.integers(0, 256, (4 if c == 11 else 6, *SHAPE), dtype=np.uint8))
    return ImageStore.open(tmp_path / "s.arrow")


def identify(store: ImageStore) -> dict[bytes, tuple[int, int, int]]:
    """Every (class, image, quarter turns) of the store by its pixels: which image an example is."""
    return {np.ascontiguousarray(np.rot90(img, k, axes=(1, 2))).tobytes(): (c, i, k)
            for c in range(store.num_classes) for i, img in enumerate(store.images(c)) for k in range(4)}


def decode(x: torch.Tensor, known: dict) -> tuple[int, int, int]:
    return known[np.round(x.numpy() * 255).astype(np.uint8).tobytes()]


def test_shapes_dtypes_ranges_and_label_layout(store):
    tasks = FewShotTasks(store, n_way=3, k_shot=2, query=3, classes=range(10))
    b = tasks.sample(EpisodeIds(seed=1, step=4, indices=(0, 1, 2, 3)))
    assert tuple(b.support_x.shape) == (4, 6, *SHAPE) and tuple(b.query_x.shape) == (4, 9, *SHAPE)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.int64
    assert b.support_x.min() >= 0 and b.support_x.max() <= 1 and b.query_x.max() <= 1
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2] and b.query_y[3].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_examples_come_from_their_labels_class_and_support_never_overlaps_query(store):
    known = identify(store)
    tasks = FewShotTasks(store, n_way=4, k_shot=2, query=3, classes=[1, 3, 5, 7, 9, 10])
    ids = EpisodeIds(seed=0, step=0, indices=tuple(range(20)))
    b = tasks.sample(ids)
    for t, index in enumerate(ids.indices):
        chosen = tasks.episode_classes(ids, index)
        seen = set()
        for xs, ys in ((b.support_x[t], b.support_y[t]), (b.query_x[t], b.query_y[t])):
            for x, y in zip(xs, ys):
                c, i, k = decode(x, known)
                assert (c, k) == chosen[int(y)] and k == 0
                assert (c, i) not in seen  # no image twice in an episode (support vs query included)
                seen.add((c, i))


def test_same_ids_give_bit_identical_episodes_from_separately_opened_stores(store, tmp_path):
    shutil.copy(store.path, tmp_path / "copy.arrow")
    a = FewShotTasks(store, 5, 1, 2, classes=range(12), rotations=True)
    b = FewShotTasks(tmp_path / "copy.arrow", 5, 1, 2, classes=range(12), rotations=True)
    ids = EpisodeIds(seed=3, step=7, indices=tuple(range(8)), purpose=Purpose.EVAL)
    ea, eb = a.sample(ids), b.sample(ids)
    alone = b.sample(EpisodeIds(3, 7, (5,), Purpose.EVAL))
    shipped = pickle.loads(pickle.dumps(a)).sample(ids)  # what a Ray worker gets: the path, not the pixels
    for e in (eb, shipped):
        for f in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(ea, f), getattr(e, f))
    assert torch.equal(ea.task(5).query_x, alone.query_x)
    other = a.sample(EpisodeIds(seed=3, step=8, indices=tuple(range(8)), purpose=Purpose.EVAL))
    assert not torch.equal(ea.support_x, other.support_x)


def test_labels_are_a_fresh_permutation_per_episode(store):
    tasks = FewShotTasks(store, n_way=3, k_shot=1, query=1, classes=[0, 1, 2])
    ids = EpisodeIds(seed=0, step=0, indices=tuple(range(60)))
    maps = {tuple(c for c, _ in tasks.episode_classes(ids, i)) for i in ids.indices}
    assert len(maps) == 6  # all 3! class -> label assignments occur
    known = identify(store)
    b = tasks.sample(ids)
    labels_of_class0 = {int(y) for t in range(60) for x, y in zip(b.support_x[t], b.support_y[t])
                        if decode(x, known)[0] == 0}
    assert labels_of_class0 == {0, 1, 2}


def test_rotations_are_four_distinct_classes_per_class(store):
    known = identify(store)
    tasks = FewShotTasks(store, n_way=5, k_shot=2, query=2, classes=[0, 1], rotations=True)
    assert tasks.num_classes == 8
    ids = EpisodeIds(seed=0, step=0, indices=tuple(range(30)))
    b = tasks.sample(ids)
    turns, same_class_twice = set(), False
    for t, index in enumerate(ids.indices):
        chosen = tasks.episode_classes(ids, index)
        assert len(set(chosen)) == 5  # distinct (class, rotation) pairs
        same_class_twice |= len({c for c, _ in chosen}) < 5
        for x, y in zip(torch.cat([b.support_x[t], b.query_x[t]]), torch.cat([b.support_y[t], b.query_y[t]])):
            c, _, k = decode(x, known)
            assert (c, k) == chosen[int(y)]
            turns.add(k)
    assert turns == {0, 1, 2, 3} and same_class_twice


def test_impossible_episodes_are_refused_at_construction(store):
    with pytest.raises(DataError, match=r"^n_way: 4 is more than the 3 classes of this split"):
        FewShotTasks(store, n_way=4, k_shot=1, query=1, classes=[0, 1, 2])
    FewShotTasks(store, n_way=4, k_shot=1, query=1, classes=[0], rotations=True)
    with pytest.raises(DataError, match=r"n_way: 5 is more than the 4 classes \(with rotations, 4 per class\)"):
        FewShotTasks(store, n_way=5, k_shot=1, query=1, classes=[0], rotations=True)
    with pytest.raises(DataError, match=r"k_shot \+ query: 2 \+ 3 = 5 images per class, but class 'c11' of this "
                                        r"split has only 4"):
        FewShotTasks(store, n_way=2, k_shot=2, query=3, classes=[0, 11])
    # Every problem at once, in one line, under the caller's names for the keys.
    keys = {"n_way": "task.train.n_way", "k_shot": "task.train.k_shot", "query": "task.query"}
    with pytest.raises(DataError) as e:
        FewShotTasks(store, n_way=13, k_shot=4, query=3, classes=range(12), keys=keys, where="the train split")
    assert str(e.value) == ("task.train.n_way: 13 is more than the 12 classes of the train split; lower it or give "
                            "the split more classes; task.train.k_shot + task.query: 4 + 3 = 7 images per class, but "
                            "class 'c11' of the train split has only 4; lower them, or leave that class out of the "
                            "split")
    with pytest.raises(DataError, match=r"class indices \[12\] are out of range .*\(12 classes\)"):
        FewShotTasks(store, n_way=2, k_shot=1, query=1, classes=[0, 12])
    with pytest.raises(DataError, match="listed twice"):
        FewShotTasks(store, n_way=2, k_shot=1, query=1, classes=[0, 0, 1])
    with pytest.raises(DataError, match="k_shot: must be >= 1, got 0"):
        FewShotTasks(store, n_way=2, k_shot=0, query=1, classes=[0, 1])


def test_group_split_keeps_groups_and_classes_apart(store):
    s = split_classes(store, by="group", train=0.5, val=0.25, test=0.25, seed=0)
    parts = [set(p) for p in (s.train, s.val, s.test)]
    groups = [{store.groups[c] for c in p} for p in parts]
    assert [len(g) for g in groups] == [2, 1, 1]
    assert set().union(*parts) == set(range(12)) and sum(map(len, parts)) == 12
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert s == split_classes(store, by="group", train=0.5, val=0.25, test=0.25, seed=0)
    assert len({split_classes(store, "group", 0.5, 0.25, 0.25, seed=k).test for k in range(8)}) > 1


def test_named_and_class_splits(store):
    s = split_classes(store, by="group", train=["g0", "g2"], val=["g1"], test=0.25, seed=0)
    assert s.train == (0, 1, 2, 6, 7, 8) and s.val == (3, 4, 5) and s.test == (9, 10, 11)
    c = split_classes(store, by="class", train=0.5, val=["c00"], test=0.25, seed=1)
    assert c.val == (0,) and len(c.train) == 6 and len(c.test) == 3
    assert not set(c.train) & set(c.test) and 0 not in c.train + c.test


def test_split_mistakes_are_named(store):
    with pytest.raises(DataError, match=r"train: unknown group names \['Greek', 'g9'\] in .*s\.arrow"):
        split_classes(store, by="group", train=["g0", "Greek", "g9"], val=0.0, test=0.0)
    with pytest.raises(DataError, match=r"group 'g1' is listed in both train and test"):
        split_classes(store, by="group", train=["g1"], val=["g0"], test=["g1"])
    with pytest.raises(DataError, match=r"add up to more than 1"):
        split_classes(store, by="class", train=0.8, val=0.2, test=0.2)
    with pytest.raises(DataError, match=r"val=0.1 of 4 group names is 0 of them"):
        split_classes(store, by="group", train=0.5, val=0.1, test=0.25)
    with pytest.raises(DataError, match=r"train='g0': give a list of group names \(e\.g\. \['g0'\]\)"):
        split_classes(store, by="group", train="g0", val=0.25, test=0.25)
    with pytest.raises(DataError, match="by must be 'group' or 'class'"):
        split_classes(store, by="alphabet", train=0.5, val=0.25, test=0.25)


def test_sampling_bytes_are_those_of_the_first_release(store):
    # Hashes of episodes drawn by the sampler before streams, groups and augmentation existed (commit 1b0fd8c):
    # a config without the new options must keep drawing exactly the same episodes.
    import hashlib

    expected = {(False, 0): "8af4bbe414586e28", (False, 1): "71f13f0f5b90bb7b",
                (True, 0): "e32a830d5839ff49", (True, 1): "4d1aaf6eebe897ca"}
    for (rotations, purpose), digest in expected.items():
        b = FewShotTasks(store, 5, 1, 3, classes=range(11), rotations=rotations).sample(
            EpisodeIds(seed=5, step=3, indices=(0, 1, 7), purpose=Purpose(purpose)))
        data = b.support_x.numpy().tobytes() + b.query_x.numpy().tobytes() + b.support_y.numpy().tobytes()
        assert hashlib.sha256(data).hexdigest()[:16] == digest


def test_within_group_episodes_draw_every_class_from_one_group(store):
    # Groups of the fixture: g0..g3 of 3 classes; leave one class of g1 out, so g1 cannot host a 3-way episode.
    classes = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    tasks = FewShotTasks(store, n_way=3, k_shot=1, query=2, classes=classes, within_group=True)
    ids = EpisodeIds(seed=0, step=1, indices=tuple(range(60)))
    known = identify(store)
    b = tasks.sample(ids)
    used = set()
    for t, index in enumerate(ids.indices):
        chosen = tasks.episode_classes(ids, index)
        groups = {store.groups[c] for c, _ in chosen}
        assert len(groups) == 1 and len(set(chosen)) == 3
        used |= groups
        for x, y in zip(b.support_x[t], b.support_y[t]):
            assert decode(x, known)[0] == chosen[int(y)][0]
    assert used == {"g0", "g2", "g3"}  # every group that can host one, and never g1
    again = FewShotTasks(store, 3, 1, 2, classes=classes, within_group=True).sample(ids)
    assert torch.equal(again.support_x, b.support_x)  # still a function of the episode id
    across = FewShotTasks(store, 3, 1, 2, classes=classes).sample(ids)
    mixed = [len({store.groups[c] for c, _ in FewShotTasks(store, 3, 1, 2, classes=classes).episode_classes(ids, i)})
             for i in ids.indices]
    assert max(mixed) > 1 and not torch.equal(across.support_x, b.support_x)


def test_within_group_with_rotations_and_groups_too_small(store):
    # With rotations a 3-class group holds 12 classes: an 8-way episode fits, all from one alphabet.
    tasks = FewShotTasks(store, n_way=8, k_shot=1, query=1, classes=range(11), rotations=True, within_group=True)
    ids = EpisodeIds(seed=2, step=0, indices=tuple(range(10)))
    for i in ids.indices:
        chosen = tasks.episode_classes(ids, i)
        assert len({store.groups[c] for c, _ in chosen}) == 1 and len(set(chosen)) == 8
    keys = {"n_way": "task.n_way", "within_group": "task.train.within_group"}
    with pytest.raises(DataError, match=r"^task\.n_way: 4 classes from one group, but the largest group of the test "
                                        r"split \('g0'\) has 3 classes; lower it or set task\.train\.within_group: "
                                        r"false$"):
        FewShotTasks(store, 4, 1, 1, classes=range(11), within_group=True, keys=keys, where="the test split")


def test_within_group_needs_groups(tmp_path):
    with StoreWriter(tmp_path / "flat.arrow", SHAPE, source="test", preprocessing="none") as w:
        for c in range(4):
            w.add_class(f"c{c}", "", np.zeros((3, *SHAPE), dtype=np.uint8))
    with pytest.raises(DataError, match=r"within_group: .*flat\.arrow has no groups to draw episodes within"):
        FewShotTasks(tmp_path / "flat.arrow", 2, 1, 1, classes=range(4), within_group=True)
