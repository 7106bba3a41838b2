"""Class splits: which classes meta-training, validation and testing may draw episodes from.

Few-shot splits are by class, never by image: a test episode must be made of
classes the learner has never seen. For Omniglot the standard is stricter, by
alphabet (``by="group"``): no alphabet is in two splits, hence no character.

Each of ``train``, ``val`` and ``test`` is either a list of names (group names
with ``by="group"``, class names with ``by="class"``) or a fraction of all the
unique names. Named ones are assigned first; the fractions are then filled
from the remaining names, taken in the order of a permutation of the sorted
unique names drawn by ``numpy.random.default_rng(seed)``. Counts are rounded
cumulatively (train, then val, then test), so fractions that sum to 1 use
every name. The result is the store's class indices of each split, sorted.

>>> s = split_classes(store, by="group", train=0.7, val=0.1, test=0.2, seed=0)
>>> s = split_classes(store, by="group", train=["train"], val=["val"], test=["test"])   # miniImageNet's own
>>> tasks = FewShotTasks(store, 5, 1, 15, classes=s.train)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import numpy as np

from tasks.store import DataError, ImageStore

SplitSpec = Union[Sequence[str], float]
"""A split: a list of names, or a fraction of all unique names."""

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassSplits:
    """Store class indices per split; no class is in two splits."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def split_classes(store: ImageStore, by: Literal["group", "class"], train: SplitSpec, val: SplitSpec,
                  test: SplitSpec, seed: int = 0) -> ClassSplits:
    """Split the store's classes by group or by class name; see the module docstring for the rules."""
    if by not in ("group", "class"):
        raise DataError(f"by must be 'group' or 'class', got {by!r}")
    label = "group" if by == "group" else "class"
    per_class = store.groups if by == "group" else store.class_names
    unique = sorted(set(per_class))
    specs = dict(zip(SPLITS, (train, val, test)))

    owner: dict[str, str] = {}
    fractions: dict[str, float] = {}
    for split, spec in specs.items():
        if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
            if not 0.0 <= float(spec) <= 1.0:
                raise DataError(f"{split}={spec}: a fraction must be in [0, 1]")
            fractions[split] = float(spec)
            continue
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
            raise DataError(f"{split}={spec!r}: give a list of {label} names (e.g. [{spec!r}]) or a fraction")
        unknown = sorted({str(n) for n in spec} - set(unique))
        if unknown:
            known = ", ".join(repr(n) for n in unique[:5]) + (", ..." if len(unique) > 5 else "")
            raise DataError(f"{split}: unknown {label} names {unknown[:5]} in {store.path}; "
                            f"its {len(unique)} {label} names are {known}")
        for name in spec:
            if owner.setdefault(name, split) != split:
                raise DataError(f"{label} {name!r} is listed in both {owner[name]} and {split}; "
                                "a class may be in one split only")
    if sum(fractions.values()) > 1.0 + 1e-9:
        raise DataError(f"the fractions {fractions} add up to more than 1")

    pool = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique)) if unique[i] not in owner]
    cum, taken = 0.0, 0
    for split, fraction in fractions.items():
        lo = round(cum * len(unique))
        cum += fraction
        count = round(cum * len(unique)) - lo
        if fraction > 0 and count == 0:
            hint = " (this store has no groups: use by='class')" if unique == [""] else ""
            raise DataError(f"{split}={fraction} of {len(unique)} {label} names is 0 of them; raise it{hint}")
        if taken + count > len(pool):
            raise DataError(f"the fractions ask for {taken + count} {label} names but only {len(pool)} are "
                            f"left after the named ones; lower the fractions")
        owner.update((name, split) for name in pool[taken:taken + count])
        taken += count
    members = {split: tuple(i for i, name in enumerate(per_class) if owner.get(name) == split) for split in SPLITS}
    return ClassSplits(**members)
