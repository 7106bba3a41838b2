"""Reading the official dataset pickles (CIFAR-100's python version, tieredImageNet) without running their code.

Unpickling runs whatever a file names: a pickle can call ``os.system``. These
datasets are distributed only as pickles, so ``load`` uses an unpickler that
builds the containers these files hold (dicts, lists, strings, numbers) and
numpy arrays, and refuses every other global with a ``DataError``. Even so,
convert only the official files, from their official sources.

Files written by Python 2 (the originals) are read with ``encoding="latin1"``,
as numpy documents for them: their ``str`` objects come back as ``str`` and
arrays keep their bytes.
"""

from __future__ import annotations

import _codecs
import pickle
import tarfile
import zlib
from typing import IO, Any

import numpy as np

from tasks.store import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

# Every global these files need, under each name numpy (1.x, 2.x) and Python (protocols 2-5) pickle it by.
_ALLOWED = {
    **{(m, "_reconstruct"): _multiarray._reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _multiarray.scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _numeric._frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,  # how Python 3 writes bytes at protocol 2
}


class _Refused(pickle.UnpicklingError):
    """A global outside ``_ALLOWED``: the file is not what it claims to be (or is an attack)."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"it names {module}.{name}, which is neither a numpy array nor a container")
        return found


def load(file: IO[bytes], where: str, what: str) -> Any:
    """Unpickle ``file`` (``where`` names it in messages, ``what`` is the dataset) with only numpy globals."""
    try:
        return _Restricted(file, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"{where} is not a {what} pickle: {e}; convert only the official files") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, OSError, zlib.error, tarfile.TarError) as e:
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise DataError(f"{where} is not a readable {what} pickle (truncated or damaged: {reason}); "
                        "download it again") from None


def mapping(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a dict with str keys (Python 2 files read as bytes keys elsewhere), holding ``keys``."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a dict with {', '.join(keys)}, found {type(value).__name__}")
    out = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        has = ", ".join(map(str, out)) or "nothing"
        raise DataError(f"{where}: the dict lacks {', '.join(missing)} (it has {has})")
    return out


def strings(value: Any, where: str) -> list[str]:
    """A list of names (str, or bytes from Python 2) as str."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, bytes)) for v in value):
        raise DataError(f"{where}: expected a list of names, found {type(value).__name__}")
    return [v.decode("latin1") if isinstance(v, bytes) else v for v in value]


def integers(value: Any, where: str, count: int, below: int) -> np.ndarray:
    """A list or array of ``count`` integers in [0, below)."""
    array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if array is None or array.ndim != 1 or len(array) != count or (count and array.dtype.kind not in "iu"):
        raise DataError(f"{where}: expected {count} integer labels, found "
                        f"{'a ' + type(value).__name__ if array is None else f'{array.dtype} {list(array.shape)}'}")
    if count and (array.min() < 0 or array.max() >= below):
        raise DataError(f"{where}: labels must lie in [0, {below}), found {int(array.min())}..{int(array.max())}")
    return array.astype(np.int64)
