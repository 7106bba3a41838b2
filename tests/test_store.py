"""The image store: atomic writes, memory-mapped zero-copy reads, and clear errors for bad files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
from image_layouts import leftovers

from tasks.store import FORMAT_VERSION, DataError, ImageStore, store_schema
from tasks.store_writer import StoreWriter

SHAPE = (1, 6, 5)


def write_store(path, classes, shape=SHAPE, **kw):
    with StoreWriter(path, shape, source="test", preprocessing="none", **kw) as w:
        for name, group, pixels in classes:
            w.add_class(name, group, pixels)
    return path


def random_classes(seed=0, counts=(3, 5, 2)):
    rng = np.random.default_rng(seed)
    return [(f"class{i}", "ab"[i % 2], rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)) for i, n in enumerate(counts)]


def test_round_trip_names_groups_pixels_and_index(tmp_path):
    classes = random_classes()
    store = ImageStore.open(write_store(tmp_path / "s.arrow", classes), verify=True)
    assert store.num_classes == 3 and store.num_images == 10
    assert store.class_names == ("class0", "class1", "class2")
    assert store.groups == ("a", "b", "a")
    assert store.image_shape == SHAPE and store.source == "test"
    for i, (_, _, pixels) in enumerate(classes):
        assert store.count(i) == len(pixels)
        assert store.images(i).dtype == np.uint8
        np.testing.assert_array_equal(store.images(i), pixels)
    assert store.class_index("class1") == 1
    # The file's own rows agree with the index: grouped by class, contiguous, one batch per class.
    table = pa.ipc.open_file(pa.memory_map(str(store.path))).read_all()
    assert table.column("class_id").to_pylist() == [0] * 3 + [1] * 5 + [2] * 2
    meta = json.loads(table.schema.metadata[b"metaray.store"])
    assert [(c["start"], c["stop"]) for c in meta["classes"]] == [(0, 3), (3, 8), (8, 10)]


def test_images_are_read_only_views_into_the_memory_map(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    for i in range(store.num_classes):
        view = store.images(i)
        assert not view.flags.owndata and not view.flags.writeable
        assert store.is_mapped(view)
    assert not store.is_mapped(np.array(store.images(0)))  # a copy is told apart


def test_content_hash_depends_on_pixels_and_labels_only(tmp_path):
    a = ImageStore.open(write_store(tmp_path / "a.arrow", random_classes(0)))
    b = ImageStore.open(write_store(tmp_path / "b.arrow", random_classes(0)))
    c = ImageStore.open(write_store(tmp_path / "c.arrow", random_classes(1)))
    renamed = [("other", g, p) for (_, g, p) in random_classes(0)[:1]] + random_classes(0)[1:]
    d = ImageStore.open(write_store(tmp_path / "d.arrow", renamed))
    assert a.content_hash == b.content_hash
    assert len({a.content_hash, c.content_hash, d.content_hash}) == 3


def test_existing_store_is_refused_unless_overwrite(tmp_path):
    dest = write_store(tmp_path / "s.arrow", random_classes(0))
    with pytest.raises(DataError, match=r"s\.arrow already exists.*overwrite"):
        write_store(dest, random_classes(1))
    same = write_store(tmp_path / "t.arrow", random_classes(0))
    assert ImageStore.open(dest).content_hash == ImageStore.open(same).content_hash  # the first store is untouched
    write_store(dest, random_classes(1), overwrite=True)
    np.testing.assert_array_equal(ImageStore.open(dest).images(0), random_classes(1)[0][2])
    assert leftovers(dest) == ["s.arrow"]


def test_a_failed_write_leaves_nothing_under_the_destination(tmp_path):
    dest = tmp_path / "s.arrow"
    with pytest.raises(RuntimeError, match="disk full"), \
            StoreWriter(dest, SHAPE, source="test", preprocessing="none") as w:
        w.add_class("a", "", random_classes()[0][2])
        raise RuntimeError("disk full")
    assert leftovers(dest) == []
    with pytest.raises(DataError, match="no classes"):
        write_store(dest, [])
    assert leftovers(dest) == []


def test_writer_rejects_wrong_shapes_and_repeated_names(tmp_path):
    with StoreWriter(tmp_path / "s.arrow", SHAPE, source="t", preprocessing="") as w:
        with pytest.raises(ValueError, match=r"expected uint8 \[n>=1, 1, 6, 5\]"):
            w.add_class("a", "", np.zeros((2, 1, 5, 6), np.uint8))
        w.add_class("a", "", np.zeros((2, *SHAPE), np.uint8))
        with pytest.raises(DataError, match="'a' is added twice"):
            w.add_class("a", "", np.zeros((2, *SHAPE), np.uint8))


def test_pickling_sends_the_path_not_the_pixels(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes(counts=(200, 200))))
    blob = pickle.dumps(store)
    assert len(blob) < 1000 < store.nbytes
    np.testing.assert_array_equal(pickle.loads(blob).images(1), store.images(1))
    write_store(store.path, random_classes(1), overwrite=True)
    with pytest.raises(DataError, match="changed since it was opened"):
        pickle.loads(blob)


def test_missing_or_folder_paths(tmp_path):
    with pytest.raises(DataError, match=r"nope\.arrow does not exist; create one with `metaray data convert"):
        ImageStore.open(tmp_path / "nope.arrow")
    with pytest.raises(DataError, match="is a folder"):
        ImageStore.open(tmp_path)


def test_truncated_or_garbage_files_are_data_errors(tmp_path):
    good = write_store(tmp_path / "s.arrow", random_classes()).read_bytes()
    (tmp_path / "cut.arrow").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.arrow").write_bytes(b"PNG not arrow" * 50)
    for name in ("cut.arrow", "junk.arrow"):
        with pytest.raises(DataError, match=rf"{name} is not a readable image store \(truncated"):
            ImageStore.open(tmp_path / name)


def test_foreign_arrow_files_and_other_versions_are_refused(tmp_path):
    table = pa.table({"x": [1, 2, 3]})
    with pa.ipc.new_file(str(tmp_path / "foreign.arrow"), table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match=r"foreign\.arrow is an Arrow file but not a metaray image store"):
        ImageStore.open(tmp_path / "foreign.arrow")

    schema = store_schema(SHAPE, {"classes": []})
    md = dict(schema.metadata)
    md[b"metaray.format_version"] = str(FORMAT_VERSION + 1).encode()
    with pa.ipc.new_file(str(tmp_path / "future.arrow"), schema.with_metadata(md)):
        pass
    with pytest.raises(DataError, match=rf"format version {FORMAT_VERSION + 1}, this metaray reads versions 1 and "
                                        rf"{FORMAT_VERSION}; convert the dataset again"):
        ImageStore.open(tmp_path / "future.arrow")


def test_an_index_that_disagrees_with_the_rows_is_corrupt(tmp_path):
    src = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    reader = pa.ipc.open_file(pa.memory_map(str(src.path)))
    meta = json.loads(reader.schema.metadata[b"metaray.store"])
    meta["classes"][1]["stop"] += 1
    with pa.ipc.new_file(str(tmp_path / "bad.arrow"), store_schema(SHAPE, meta)) as w:
        for i in range(reader.num_record_batches):
            w.write_batch(reader.get_batch(i))
    with pytest.raises(DataError, match=r"bad\.arrow is corrupt \(class 'class1' has rows \[3, 9\)"):
        ImageStore.open(tmp_path / "bad.arrow")


def tampered_copy(store: ImageStore, class_index: int, dest) -> ImageStore:
    """A byte-for-byte copy of ``store`` with one pixel byte of class ``class_index`` flipped; metadata intact."""
    data = bytearray(store.path.read_bytes())
    offset = store.images(class_index).ctypes.data - store._whole.address  # where the class's pixels lie in the file
    data[offset + 1] ^= 0xFF
    dest.write_bytes(bytes(data))
    return ImageStore.open(dest)  # a cheap open reads structure only: it succeeds


def test_altered_pixels_are_caught_at_the_first_read_of_their_class_and_by_verify(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    flipped = tampered_copy(store, 1, tmp_path / "flipped.arrow")
    assert flipped.count(1) == 5  # counting reads the index, not the pixels
    np.testing.assert_array_equal(flipped.images(0), store.images(0))  # intact classes read as before
    with pytest.raises(DataError, match=r"flipped\.arrow is corrupt: the pixels of class 'class1' do not match the "
                                        r"checksum written with them; convert the dataset again \(`metaray data "
                                        r"verify .*flipped\.arrow` checks the whole store\)"):
        flipped.images(1)
    with pytest.raises(DataError, match=r"flipped\.arrow is corrupt: the pixels of class 'class1' do not match"):
        flipped.images(1)  # still refused: a bad class is never marked as checked
    with pytest.raises(DataError, match=r"flipped\.arrow is corrupt: the pixels of class 'class1'"):
        ImageStore.open(tmp_path / "flipped.arrow", verify=True)
    # Pickled to a worker, the store re-opens and checks there too.
    with pytest.raises(DataError, match="class 'class1'"):
        pickle.loads(pickle.dumps(flipped)).images(1)
    ImageStore.open(store.path, verify=True)  # the original is sound


def test_a_class_is_checked_once_per_process(tmp_path, monkeypatch):
    import tasks.store as store_module

    store = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    calls = []
    real = store_module.class_checksum
    monkeypatch.setattr(store_module, "class_checksum", lambda pixels: calls.append(len(pixels)) or real(pixels))
    for _ in range(3):
        store.images(1), store.images(2)
    assert calls == [5, 2]


def as_version_1(src: ImageStore, dest) -> None:
    """Rewrite ``src`` exactly as the version-1 writer did: the same rows and metadata, without class checksums."""
    reader = pa.ipc.open_file(pa.memory_map(str(src.path)))
    meta = json.loads(reader.schema.metadata[b"metaray.store"])
    for c in meta["classes"]:
        del c["crc32"]
    schema = store_schema(src.image_shape, meta)
    md = dict(schema.metadata)
    md[b"metaray.format_version"] = b"1"
    with pa.ipc.new_file(str(dest), schema.with_metadata(md)) as w:
        for i in range(reader.num_record_batches):
            w.write_batch(reader.get_batch(i))


def test_version_1_stores_still_open_and_are_verified_whole_at_first_read(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    as_version_1(store, tmp_path / "v1.arrow")
    old = ImageStore.open(tmp_path / "v1.arrow")
    assert old.format_version == 1 and old.content_hash == store.content_hash
    np.testing.assert_array_equal(old.images(2), store.images(2))
    as_version_1(tampered_copy(store, 1, tmp_path / "flipped.arrow"), tmp_path / "v1-flipped.arrow")
    bad = ImageStore.open(tmp_path / "v1-flipped.arrow")
    with pytest.raises(DataError, match=r"v1-flipped\.arrow is corrupt: its pixels or labels do not match its "
                                        r"content hash"):
        bad.images(0)  # class 0 is intact, but a version-1 store can only be checked whole


def test_a_version_2_index_without_checksums_is_corrupt(tmp_path):
    src = ImageStore.open(write_store(tmp_path / "s.arrow", random_classes()))
    reader = pa.ipc.open_file(pa.memory_map(str(src.path)))
    meta = json.loads(reader.schema.metadata[b"metaray.store"])
    meta["classes"][2]["crc32"] = "x"
    with pa.ipc.new_file(str(tmp_path / "bad.arrow"), store_schema(SHAPE, meta)) as w:
        for i in range(reader.num_record_batches):
            w.write_batch(reader.get_batch(i))
    with pytest.raises(DataError, match=r"bad\.arrow is corrupt \(unreadable store metadata: KeyError 'crc32'\)"):
        ImageStore.open(tmp_path / "bad.arrow")
