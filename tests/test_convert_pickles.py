"""CIFAR-FS, FC100 (from CIFAR-100's python pickles) and tieredImageNet (its pickles): round trips on tiny files in
the real formats, the shipped standard splits, and bad inputs (one clear DataError, nothing written, no code run)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from image_layouts import leftovers
from pickle_layouts import COARSE_NAMES, FINE_NAMES, Exploit, cifar100, dump, png, tar_gz, tiered
from PIL import Image

from tasks.converters.cifar import convert_cifar_fs, convert_fc100
from tasks.converters.cifar_splits import CIFAR_FS, FC100
from tasks.converters.tieredimagenet import convert_tieredimagenet
from tasks.splits import split_classes
from tasks.store import DataError, ImageStore


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    return folder, cifar100(folder)


def test_cifar_fs_keeps_all_600_images_per_class_and_the_standard_split(cifar, tmp_path):
    folder, expected = cifar
    done = convert_cifar_fs(folder, tmp_path / "fs.arrow")
    store = ImageStore.open(done.dest, verify=True)
    assert (done.num_classes, done.num_images, store.image_shape) == (100, 300, (3, 32, 32))
    for name, pixels in expected.items():  # train images, then test images, each in file order
        np.testing.assert_array_equal(store.images(store.class_index(name)), pixels)
    s = split_classes(store, by="group", train=["train"], val=["val"], test=["test"])
    for split in ("train", "val", "test"):
        assert sorted(store.class_names[c] for c in getattr(s, split)) == sorted(CIFAR_FS[split])
    assert [len(CIFAR_FS[k]) for k in ("train", "val", "test")] == [64, 16, 20]


def test_fc100_splits_by_superclass_from_the_tar_archive(cifar, tmp_path):
    folder, _ = cifar
    done = convert_fc100(tar_gz(folder, tmp_path / "cifar-100-python.tar.gz"), tmp_path / "fc.arrow")
    store = ImageStore.open(done.dest)
    superclass = {name: COARSE_NAMES[f // 5] for f, name in enumerate(FINE_NAMES)}  # as the files say
    for split, supers in FC100.items():
        members = [n for n, g in zip(store.class_names, store.groups) if g == split]
        assert sorted(members) == sorted(n for n in FINE_NAMES if superclass[n] in supers)
        assert len(members) == 5 * len(supers)
    assert [len(FC100[k]) for k in ("train", "val", "test")] == [12, 4, 4]


@pytest.mark.parametrize("protocol", [2, 5])
def test_files_re_saved_by_python_3_read_the_same(tmp_path, protocol):
    expected = cifar100(tmp_path / "p", protocol=protocol)
    store = ImageStore.open(convert_cifar_fs(tmp_path / "p", tmp_path / "fs.arrow").dest)
    np.testing.assert_array_equal(store.images(store.class_index("worm")), expected["worm"])


def test_resizing_matches_pillow(cifar, tmp_path):
    folder, expected = cifar
    store = ImageStore.open(convert_cifar_fs(folder, tmp_path / "fs16.arrow", size=16).dest)
    got = store.images(store.class_index("apple"))
    for image, source in zip(got, expected["apple"]):
        small = Image.fromarray(source.transpose(1, 2, 0)).resize((16, 16), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(image, np.asarray(small).transpose(2, 0, 1))


def break_cifar(folder, part, change):
    obj = pickle.loads((folder / part).read_bytes(), encoding="latin1")
    change(obj)
    dump(obj, folder / part)


def replace(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("part, change, message", [
    ("meta", replace("fine_label_names", FINE_NAMES[:10]), r"fine_label_names must be 100 distinct names, found 10"),
    ("meta", replace("fine_label_names", ["x" + n for n in FINE_NAMES]), r"lacks the CIFAR-FS class names"),
    ("meta", lambda d: d.pop("coarse_label_names"), r"meta: the dict lacks coarse_label_names"),
    ("train", replace("data", np.zeros((200, 100), np.uint8)), r"train: data must be uint8 \[N, 3072\].*\[200, 100\]"),
    ("train", replace("fine_labels", [100] * 200), r"train: fine_labels: labels must lie in \[0, 100\), found 100"),
    ("train", replace("fine_labels", [1, 2]), r"train: fine_labels: expected 200 integer labels"),
    ("test", replace("coarse_labels", [0] * 100), r"src: a fine label appears under two coarse labels"),
])
def test_bad_cifar_files_are_named_and_nothing_is_written(tmp_path, part, change, message):
    cifar100(tmp_path / "src")
    break_cifar(tmp_path / "src", part, change)
    with pytest.raises(DataError, match=message):
        convert_cifar_fs(tmp_path / "src", tmp_path / "out.arrow")
    assert leftovers(tmp_path / "out.arrow") == []


def test_a_class_without_images_is_named(tmp_path):
    cifar100(tmp_path / "src")
    for part, n in (("train", 200), ("test", 100)):
        break_cifar(tmp_path / "src", part, replace("fine_labels", [k % 7 for k in range(n)]))
    with pytest.raises(DataError, match=r"src: fine labels \[7, 8, 9, 10, 11\] \.\.\. have no images; give the whole"):
        convert_fc100(tmp_path / "src", tmp_path / "out.arrow")


def test_pickles_that_would_run_code_are_refused_and_run_nothing(tmp_path):
    cifar100(tmp_path / "src")
    marker = tmp_path / "pwned"
    (tmp_path / "src" / "meta").write_bytes(pickle.dumps({"fine_label_names": Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"meta is not a CIFAR-100 pickle: it names (posix|os)\.system, which is "
                                        r"neither a numpy array nor a container; convert only the official files"):
        convert_cifar_fs(tmp_path / "src", tmp_path / "out.arrow")
    assert not marker.exists() and leftovers(tmp_path / "out.arrow") == []
    pickle.loads((tmp_path / "src" / "meta").read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_unreadable_cifar_sources(cifar, tmp_path):
    folder, _ = cifar
    (tmp_path / "cut").mkdir()
    for part in ("meta", "train", "test"):
        data = (folder / part).read_bytes()
        (tmp_path / "cut" / part).write_bytes(data[: len(data) // 2] if part == "train" else data)
    with pytest.raises(DataError, match=r"cut/train is not a readable CIFAR-100 pickle \(truncated or damaged"):
        convert_cifar_fs(tmp_path / "cut", tmp_path / "out.arrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no file 'meta'; give the cifar-100-python folder"):
        convert_fc100(tmp_path / "empty", tmp_path / "out.arrow")
    (tmp_path / "x.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match=r"x\.tar\.gz is neither a folder nor a readable tar archive"):
        convert_fc100(tmp_path / "x.tar.gz", tmp_path / "out.arrow")
    with pytest.raises(DataError, match=r"source .*missing does not exist"):
        convert_fc100(tmp_path / "missing", tmp_path / "out.arrow")
    (tmp_path / "out.arrow").write_bytes(b"taken")
    with pytest.raises(DataError, match=r"out\.arrow already exists"):  # refused before reading anything
        convert_cifar_fs(tmp_path / "missing", tmp_path / "out.arrow")
    assert leftovers(tmp_path / "out.arrow") == ["out.arrow"]


TIERED = {"train": {"n01": "s0", "n02": "s0", "n03": "s1"}, "val": {"n04": "s2"}, "test": {"n05": "s3", "n06": "s3"}}


def test_tieredimagenet_round_trip_with_the_split_files_as_groups(tmp_path):
    expected = tiered(tmp_path / "tiered-imagenet", TIERED)
    done = convert_tieredimagenet(tmp_path, tmp_path / "t.arrow", size=12)  # the parent folder is found too
    store = ImageStore.open(done.dest, verify=True)
    assert (done.num_classes, done.num_images, store.image_shape) == (6, 18, (3, 12, 12))
    for name, pixels in expected.items():
        np.testing.assert_array_equal(store.images(store.class_index(name)), pixels)
    s = split_classes(store, by="group", train=["train"], val=["val"], test=["test"])
    assert [store.class_names[c] for c in s.test] == ["n05", "n06"] and len(s.train) == 3


def test_bad_tieredimagenet_files(tmp_path):
    root = tmp_path / "tiered-imagenet"
    tiered(root, TIERED)
    items = pickle.loads((root / "val_images_png.pkl").read_bytes(), encoding="latin1")
    items[1] = np.frombuffer(b"not a png at all", dtype=np.uint8).reshape(-1, 1).copy()
    dump(items, root / "val_images_png.pkl")
    with pytest.raises(DataError, match=r"image 1 of .*val_images_png\.pkl \(class 'n04'\) cannot be decoded"):
        convert_tieredimagenet(root, tmp_path / "t.arrow", size=12)
    assert leftovers(tmp_path / "t.arrow") == []

    dump(items[:2], root / "val_images_png.pkl")
    with pytest.raises(DataError, match=r"val_images_png\.pkl: expected a list of 3 encoded images .* found 2 items"):
        convert_tieredimagenet(root, tmp_path / "t.arrow", size=12)

    tiered(root, {**TIERED, "val": {"n01": "s2"}})
    with pytest.raises(DataError, match=r"class 'n01' is in both train and val"):
        convert_tieredimagenet(root, tmp_path / "t.arrow", size=12)

    tiered(root, TIERED)
    labels = pickle.loads((root / "test_labels.pkl").read_bytes(), encoding="latin1")
    labels["label_general"] = np.arange(6, dtype=np.int64) % 2
    dump(labels, root / "test_labels.pkl")
    with pytest.raises(DataError, match=r"test_labels\.pkl: label_general: labels must lie in \[0, 1\)"):
        convert_tieredimagenet(root, tmp_path / "t.arrow", size=12)

    (root / "test_labels.pkl").unlink()
    with pytest.raises(DataError, match=r"has no test_labels\.pkl; give the tiered-imagenet folder"):
        convert_tieredimagenet(root, tmp_path / "t.arrow")
    marker = tmp_path / "pwned"
    (root / "test_labels.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(DataError, match=r"test_labels\.pkl is not a tieredImageNet labels pickle"):
        convert_tieredimagenet(root, tmp_path / "t.arrow")
    assert not marker.exists() and leftovers(tmp_path / "t.arrow") == []


def test_png_helper_is_what_cv2_imencode_gives():
    encoded = png(np.zeros((4, 4, 3), np.uint8))
    assert encoded.dtype == np.uint8 and encoded.shape[1] == 1 and bytes(encoded[:8, 0]) == b"\x89PNG\r\n\x1a\n"
