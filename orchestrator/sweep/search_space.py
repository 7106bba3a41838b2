"""A sweep's search space: ``--search KEY=SPACE`` axes over config keys, and the trials they expand to.

    --search 'algorithm.inner_lr=loguniform(1e-3, 1)'   a draw per trial
    --search 'outer.lr=grid([0.001, 0.01])'             one trial per value (``--grid 'outer.lr=[...]'`` is the same)
    --search 'algorithm.name=choice([maml, fomaml])'    a draw per trial

SPACE is ``grid([..])``, ``choice([..])``, ``uniform(a, b)``, ``loguniform(a, b)`` or ``randint(a, b)``
(``a <= n < b``, as in Ray Tune). As in Ray Tune, ``samples`` repeats the whole grid, and every repeat
draws the random axes anew. The draws come from a generator seeded by the sweep, so the trials are
known, named and validated before any of them starts, and the same command gives the same trials.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from orchestrator.config import ConfigError, parse_yaml

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys the sweep sets itself for every trial.
RESERVED = ("run.name", "run.dir", "tracking.uri", "tracking.experiment", "tracking.enabled", "workers.address")
_SPACE = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Axis:
    """One swept config key: ``values`` for grid/choice, ``low``/``high`` for the ranges."""

    key: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return int(rng.integers(int(self.low), int(self.high)))  # randint


def parse_search(item: str, shown: str | None = None) -> Axis:
    """``KEY=SPACE`` -> an Axis; a malformed item is a ConfigError naming it (as ``shown``) and the accepted forms."""
    key, sep, space = item.partition("=")
    key = key.strip()
    flag = shown or f"--search {item!r}"
    hint = (f"{flag}: expected KEY=SPACE with SPACE one of grid([v1, v2]), choice([v1, v2]), "
            "uniform(a, b), loguniform(a, b), randint(a, b), e.g. --search 'algorithm.inner_lr=loguniform(1e-3, 1)'")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+", key):
        raise ConfigError(hint)
    if key in RESERVED:
        raise ConfigError(f"{flag}: {key} is set by the sweep for every trial and cannot be swept")
    match = _SPACE.match(space)
    if not match or match.group(1) not in KINDS:
        raise ConfigError(hint)
    kind, raw = match.groups()
    try:
        args = parse_yaml(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(f"{hint} (the arguments {raw.strip()!r} are not valid YAML)") from None
    return _axis(key, kind, args, flag)


def parse_grid(item: str) -> Axis:
    """``--grid 'KEY=[v1, v2]'``, the older spelling of ``--search 'KEY=grid([v1, v2])'``."""
    key, sep, raw = item.partition("=")
    if not sep or not raw.strip().startswith("["):
        raise ConfigError(f"--grid {item!r}: expected KEY=[v1, v2, ...], e.g. --grid 'outer.lr=[0.001, 0.01]'")
    return parse_search(f"{key}=grid({raw})", f"--grid {item!r}")


def _axis(key: str, kind: str, args: list, where: str) -> Axis:
    if kind in ("grid", "choice"):
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise ConfigError(f"{where}: {kind} takes one non-empty list, e.g. {kind}([0.001, 0.01])")
        return Axis(key, kind, values=tuple(args[0]))
    numbers = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or not all(math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: {kind} takes two finite numbers, e.g. {kind}(1, 10)")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {kind}(a, b) needs a < b, got a={low}, b={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform(a, b) needs 0 < a, got a={low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint(a, b) takes two integers (a <= n < b), got {low}, {high}")
    return Axis(key, kind, low=low, high=high)


def expand(axes: list[Axis], samples: int, seed: int) -> list[dict[str, Any]]:
    """The swept values of every trial, in order: ``samples`` repeats of the grid, random axes drawn anew."""
    keys = [a.key for a in axes]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ConfigError(f"--search/--grid: {', '.join(duplicated)} is swept twice; give each key one space")
    grid = [a for a in axes if a.kind == "grid"]
    drawn = [a for a in axes if a.kind != "grid"]
    rng = np.random.default_rng([seed, 0x5EE9])
    trials = []
    for _ in range(samples):
        for combo in itertools.product(*(a.values for a in grid)):
            values = dict(zip((a.key for a in grid), combo))
            values.update({a.key: a.draw(rng) for a in drawn})
            trials.append({k: values[k] for k in keys})  # in the order the user gave the axes
    return trials
