"""Tiny CIFAR-100 (python version) and tieredImageNet datasets in their real on-disk formats, for converter tests.

The official files were written by Python 2: protocol-2 pickles whose strings are Python 2 ``str``
(SHORT_BINSTRING / BINSTRING opcodes, read back with ``encoding="latin1"``) and whose arrays name
``numpy.core.multiarray._reconstruct``. Python 3 cannot write those opcodes, so ``py2_pickle`` emits them
itself for the few types these files hold (dict, list, str, int, None, numpy arrays). ``protocol`` other than
"py2" writes the same objects with Python 3's pickle, as a user who re-saved the files would.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.converters.cifar_splits import CIFAR_FS, FC100

FINE_NAMES = sorted(n for names in CIFAR_FS.values() for n in names)  # CIFAR-100's meta lists them alphabetically
COARSE_NAMES = sorted(n for names in FC100.values() for n in names)


def _str(s: str | bytes) -> bytes:
    data = s.encode("latin1") if isinstance(s, str) else s
    return (b"U" + struct.pack("<B", len(data)) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def _int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + struct.pack("<B", i)
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _py2(obj) -> bytes:
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, (int, np.integer)):
        return _int(int(obj))
    if isinstance(obj, (str, bytes)):
        return _str(obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):  # what numpy 1.x wrote under Python 2
        a = np.ascontiguousarray(obj)
        descr = a.dtype.str  # e.g. '|u1', '<i8'
        dtype = (b"cnumpy\ndtype\n" + _tuple([_str(descr[1:]), _int(0), _int(1)]) + b"R"
                 + _tuple([_int(3), _str(descr[0]), b"N", b"N", b"N", b"J\xff\xff\xff\xff", b"J\xff\xff\xff\xff",
                           _int(0)]) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str("b")
                + b"\x87R" + _tuple([_int(1), _tuple([_int(d) for d in a.shape]), dtype, b"\x89",
                                     _str(a.tobytes())]) + b"b")
    raise TypeError(type(obj))


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"."


def dump(obj, path: Path, protocol: str | int = "py2") -> Path:
    path.write_bytes(py2_pickle(obj) if protocol == "py2" else pickle.dumps(obj, protocol=protocol))
    return path


def cifar100(folder: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0,
             protocol: str | int = "py2") -> dict:
    """``folder/{meta,train,test}`` like cifar-100-python; fine label f is in coarse label f // 5 (all that matters
    is that it is consistent). Returns the labelled pixels: {fine name: uint8 [n, 3, 32, 32], train's then test's}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    dump({"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES}, folder / "meta", protocol)
    expected: dict[str, list[np.ndarray]] = {n: [] for n in FINE_NAMES}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))  # shuffled, as in the real files
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        for f, row in zip(fine.tolist(), data):
            expected[FINE_NAMES[f]].append(row.reshape(3, 32, 32))
        dump({"filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": f"{part} batch",
              "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": data},
             folder / part, protocol)
    return {n: np.stack(v) for n, v in expected.items()}


def tar_gz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return dest


def png(pixels_hwc: np.ndarray) -> np.ndarray:
    """An encoded PNG as cv2.imencode returns it: uint8 [n, 1]."""
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(-1, 1).copy()


def tiered(folder: Path, classes: dict[str, dict[str, str]], per_class: int = 3, size: int = 12,
           seed: int = 0) -> dict:
    """``folder/{split}_images_png.pkl`` + ``{split}_labels.pkl``; ``classes[split]`` maps class -> superclass.
    Returns {class: uint8 [n, 3, size, size]} in file order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, members in classes.items():
        names, supers = list(members), sorted(set(members.values()))
        specific = rng.permutation(np.repeat(np.arange(len(names)), per_class))
        images = rng.integers(0, 256, (len(specific), size, size, 3), dtype=np.uint8)
        for k, name in enumerate(names):
            expected[name] = images[specific == k].transpose(0, 3, 1, 2)
        general = np.array([supers.index(members[names[k]]) for k in specific], dtype=np.int64)
        dump([png(img) for img in images], folder / f"{split}_images_png.pkl")
        dump({"label_specific": specific.astype(np.int64), "label_general": general,
              "label_specific_str": names, "label_general_str": supers}, folder / f"{split}_labels.pkl")
    return expected


class Exploit:
    """A pickle payload that would run a command on load: ``os.system('touch <marker>')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)
