"""Source converters on tiny datasets in the real layouts: round trips, merging, and every bad-input case."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from image_layouts import (
    expected_pixels,
    imagefolder,
    leftovers,
    miniimagenet_folder,
    omniglot_folder,
    write_image,
    zip_folder,
)

from tasks.converters.imagefolder import convert_imagefolder
from tasks.converters.miniimagenet import convert_miniimagenet
from tasks.converters.omniglot import convert_omniglot
from tasks.store import DataError, ImageStore


@pytest.fixture
def omniglot(tmp_path):
    return omniglot_folder(tmp_path / "src", {"Greek": 3, "Latin": 2}, drawings=4)


def test_omniglot_folder_round_trip_is_inverted_greyscale(omniglot, tmp_path):
    done = convert_omniglot([omniglot], tmp_path / "o.arrow", size=14)
    store = ImageStore.open(done.dest)
    assert (done.num_classes, done.num_images, done.skipped) == (5, 20, ())
    assert store.class_names == ("Greek/character01", "Greek/character02", "Greek/character03",
                                 "Latin/character01", "Latin/character02")
    assert store.groups == ("Greek",) * 3 + ("Latin",) * 2
    assert store.image_shape == (1, 14, 14)
    for i, name in enumerate(store.class_names):
        pngs = sorted((omniglot / name).glob("*.png"))
        want = np.stack([expected_pixels(p, "L", 14, invert=True) for p in pngs])
        np.testing.assert_array_equal(store.images(i), want)
    # Strokes (black in the PNG) are bright in the store: the background (most pixels) is dark.
    assert np.median(store.images(0)) < 128


def test_omniglot_zip_equals_folder_and_merges_overlapping_minimal_splits(omniglot, tmp_path):
    from_folder = ImageStore.open(convert_omniglot([omniglot], tmp_path / "f.arrow").dest)
    zipped = zip_folder(omniglot, tmp_path / "images_background.zip")
    from_zip = ImageStore.open(convert_omniglot([zipped], tmp_path / "z.arrow").dest)
    assert from_zip.content_hash == from_folder.content_hash
    assert from_zip.image_shape == (1, 28, 28)
    # Like images_background_small1/2: both hold Latin (same files), each has one alphabet of its own.
    small1 = omniglot_folder(tmp_path / "s1", {"Latin": 2, "Greek": 3}, set_name="images_background_small1")
    small2 = omniglot_folder(tmp_path / "s2", {"Latin": 2}, set_name="images_background_small2")
    omniglot_folder(tmp_path / "s2", {"Korean": 2}, set_name="images_background_small2", seed=5, first_id=50)
    merged = convert_omniglot([zip_folder(small1, tmp_path / "s1.zip"), small2], tmp_path / "m.arrow")
    store = ImageStore.open(merged.dest)
    assert (merged.num_classes, merged.num_images) == (7, 28)
    assert sorted(set(store.groups)) == ["Greek", "Korean", "Latin"]
    swapped = convert_omniglot([small2, tmp_path / "s1.zip"], tmp_path / "m2.arrow")
    assert ImageStore.open(swapped.dest).content_hash == store.content_hash


def test_omniglot_same_drawing_name_with_different_pixels_is_refused(omniglot, tmp_path):
    other = omniglot_folder(tmp_path / "other", {"Greek": 1}, seed=9)
    with pytest.raises(DataError, match=r"0001_01\.png of 'Greek/character01' but differ; convert these sources "
                                        "into separate stores"):
        convert_omniglot([omniglot, other], tmp_path / "o.arrow")
    assert leftovers(tmp_path / "o.arrow") == []


def test_miniimagenet_keeps_the_official_split_as_groups(tmp_path):
    root = miniimagenet_folder(tmp_path / "mini", {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04"]})
    done = convert_miniimagenet([root], tmp_path / "m.arrow", size=12)
    store = ImageStore.open(done.dest)
    assert store.class_names == ("n01", "n02", "n03", "n04")
    assert store.groups == ("train", "train", "val", "test")
    assert store.image_shape == (3, 12, 12)
    files = [line.split(",")[0] for line in (root / "val.csv").read_text().splitlines()[1:]]
    want = np.stack([expected_pixels(root / "images" / f, "RGB", 12) for f in files])
    np.testing.assert_array_equal(store.images(2), want)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_imagefolder_round_trip(tmp_path, channels, mode):
    root = imagefolder(tmp_path / "folder", {"cat": 3, "dog": 2}, mode="RGB")
    store = ImageStore.open(convert_imagefolder([root], tmp_path / "i.arrow", size=10, channels=channels).dest)
    assert store.class_names == ("cat", "dog") and store.groups == ("", "")
    assert store.image_shape == (channels, 10, 10)
    want = np.stack([expected_pixels(p, mode, 10) for p in sorted((root / "dog").iterdir())])
    np.testing.assert_array_equal(store.images(1), want)


def test_progress_counts_every_image(omniglot, tmp_path):
    calls = []
    convert_omniglot([omniglot], tmp_path / "o.arrow", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 20) for i in range(1, 21)]


# --- bad input: a DataError naming the thing, and nothing under the destination ---------------------------


def _corrupt(omniglot):
    (omniglot / "Greek/character02/0002_03.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _truncated(omniglot):
    p = omniglot / "Latin/character01/0004_02.png"
    p.write_bytes(p.read_bytes()[:40])


def _empty_class(omniglot):
    (omniglot / "Greek/character09").mkdir()


BAD_OMNIGLOT = [
    (_corrupt, {}, r"image .*Greek/character02/0002_03\.png \(class 'Greek/character02'\) cannot be read"),
    (_truncated, {}, r"image .*Latin/character01/0004_02\.png \(class 'Latin/character01'\) cannot be read"),
    (_empty_class, {}, r"class 'Greek/character09' \(.*Greek/character09\) has no images; remove the empty folder"),
    (lambda o: None, {"min_per_class": 5}, r"class 'Greek/character01' .* has 4 images, fewer than the 5 required"),
]


@pytest.mark.parametrize("damage,kw,message", BAD_OMNIGLOT)
def test_bad_omniglot_input_fails_cleanly(omniglot, tmp_path, damage, kw, message):
    damage(omniglot)
    with pytest.raises(DataError, match=message + r".*or pass --skip-bad"):
        convert_omniglot([omniglot], tmp_path / "o.arrow", **kw)
    assert leftovers(tmp_path / "o.arrow") == []


def test_skip_bad_leaves_out_and_lists_every_bad_thing(omniglot, tmp_path):
    _corrupt(omniglot)
    _empty_class(omniglot)
    (omniglot / "Latin/character02/0005_01.png").unlink()  # 3 images left, below min_per_class=4
    done = convert_omniglot([omniglot], tmp_path / "o.arrow", skip_bad=True, min_per_class=4)
    store = ImageStore.open(done.dest)
    # character02 of Greek lost one image and with it its 4th: the class goes too.
    assert store.class_names == ("Greek/character01", "Greek/character03", "Latin/character01")
    lines = done.skipped_path.read_text().splitlines()
    assert done.skipped_path.name == "o.arrow.skipped.txt" and lines == list(done.skipped)
    assert len(lines) == 4
    assert "Greek/character09" in lines[0] and "no images" in lines[0]
    assert "Latin/character02" in lines[1] and "3 images, fewer than the 4" in lines[1]
    assert "0002_03.png" in lines[2] and "cannot be read" in lines[2]
    assert "Greek/character02" in lines[3] and "3 readable images" in lines[3]
    # Converting the repaired source over it removes the stale list.
    shutil.rmtree(omniglot / "Greek/character09")
    write_image(omniglot / "Greek/character02/0002_03.png", np.random.default_rng(1), (21, 21), "1")
    again = convert_omniglot([omniglot], tmp_path / "o.arrow", overwrite=True, skip_bad=True, min_per_class=3)
    assert again.skipped == () and again.num_classes == 5
    assert leftovers(tmp_path / "o.arrow") == ["o.arrow"]


def test_duplicate_class_names(tmp_path):
    a = imagefolder(tmp_path / "a", {"cat": 2, "dog": 2})
    b = imagefolder(tmp_path / "b", {"cat": 2}, seed=1)
    with pytest.raises(DataError, match=r"class 'cat' appears twice: in .*a/cat and in .*b/cat; rename one"):
        convert_imagefolder([a, b], tmp_path / "i.arrow")
    assert leftovers(tmp_path / "i.arrow") == []
    done = convert_imagefolder([a, b], tmp_path / "i.arrow", skip_bad=True)
    assert ImageStore.open(done.dest).class_names == ("cat", "dog")
    assert "class 'cat' appears twice" in done.skipped_path.read_text()

    mini = miniimagenet_folder(tmp_path / "mini", {"train": ["n01"], "val": ["n01"], "test": ["n02"]})
    with pytest.raises(DataError, match=r"class 'n01' appears twice: in .*train\.csv and in .*val\.csv"):
        convert_miniimagenet([mini], tmp_path / "m.arrow")


def test_missing_sources(tmp_path):
    for convert, kind in [(convert_omniglot, "Omniglot"), (convert_miniimagenet, "miniImageNet"),
                          (convert_imagefolder, "ImageFolder")]:
        with pytest.raises(DataError, match=rf"{kind} source .*nowhere\.zip does not exist"):
            convert([tmp_path / "nowhere.zip"], tmp_path / "s.arrow")
    assert leftovers(tmp_path / "s.arrow") == []


def test_sources_in_the_wrong_layout(omniglot, tmp_path):
    with pytest.raises(DataError, match=r"Greek is not in the Omniglot layout: .*0001_01\.png is not at "
                                        r"\[<set>/\]<alphabet>/<character>/<drawing>\.png"):
        convert_omniglot([omniglot / "Greek"], tmp_path / "s.arrow")
    with pytest.raises(DataError, match=r"is not in the Omniglot layout: no .*\.png inside"):
        convert_omniglot([imagefolder(tmp_path / "jpgs", {"a": 0})], tmp_path / "s.arrow")
    with pytest.raises(DataError, match=r"images_background is not in the ImageFolder layout: image Greek/"
                                        r"character01/0001_01\.png is not directly inside a class folder.*"
                                        "for Omniglot use `data convert omniglot`"):
        convert_imagefolder([omniglot], tmp_path / "s.arrow")
    with pytest.raises(DataError, match=r"loose is not in the ImageFolder layout: image 0\.png"):
        write_image(tmp_path / "loose/0.png", np.random.default_rng(0))
        convert_imagefolder([tmp_path / "loose"], tmp_path / "s.arrow")
    with pytest.raises(DataError, match=r"miniImageNet \(Ravi & Larochelle\) layout: it has no val\.csv, test\.csv"):
        convert_miniimagenet([miniimagenet_folder(tmp_path / "m1", {"train": ["n01"]})], tmp_path / "s.arrow")
    m2 = miniimagenet_folder(tmp_path / "m2", {s: [f"n0{i}"] for i, s in enumerate(("train", "val", "test"))})
    (m2 / "val.csv").write_text("image,class\nx.jpg,n01\n")
    with pytest.raises(DataError, match=r"val\.csv must start with the header 'filename,label', found 'image,class'"):
        convert_miniimagenet([m2], tmp_path / "s.arrow")
    (m2 / "val.csv").write_text("filename,label\nmissing.jpg,n01\n")
    with pytest.raises(DataError, match=r"images/missing\.jpg \(class 'n01'\) cannot be read"):
        convert_miniimagenet([m2], tmp_path / "s.arrow")
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"out is a folder; give the store a file name, e\.g\. .*out/store\.arrow"):
        convert_omniglot([omniglot], tmp_path / "out")
    assert leftovers(tmp_path / "s.arrow") == []
