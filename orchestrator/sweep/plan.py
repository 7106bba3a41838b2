"""Planning a sweep: its trials expanded from the configs and the search space, named, and validated.

Nothing starts here. Every trial's config is built and checked (``ConfigError``, one line naming the key
or flag), its paths made absolute (trials run in other processes, folders and machines), and its name
put together from its swept values, so ``metaray sweep`` fails before it starts anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError, load_config
from orchestrator.config.sections import mask_secrets
from orchestrator.sweep.search_space import Axis, expand, parse_grid, parse_search
from orchestrator.tracking.store import absolute_uri, experiment_name, resolve_uri

# What schedulers and "best trial" compare by default: the validation loss when every trial validates
# (eval.every), else the meta-training loss (on the trials' common training batches).
VALIDATION_METRIC, TRAINING_METRIC = "val/loss", "meta/loss"
METRIC_PREFIXES = ("meta/", "inner/", "val/", "orchestrator/", "perf/")
STATE = "sweep.json"  # in the sweep's folder: its trials and its parent run, for --resume


@dataclass(frozen=True)
class TrialSpec:
    name: str
    swept: dict[str, Any]
    config: Config


@dataclass(frozen=True)
class Plan:
    """A validated sweep: its folder, trials and settings; nothing has started."""

    name: str
    folder: Path
    trials: list[TrialSpec]
    settings: dict[str, Any]  # what the parent run records (and --resume compares)

    @property
    def first(self) -> Config:
        return self.trials[0].config


def plan(paths: list[str], overrides: list[str] = (), search: list[str] = (), grid: list[str] = (),
         samples: int = 1, scheduler: str = "fifo", metric: str | None = None, mode: str = "min",
         experiment: str | None = None, name: str | None = None) -> Plan:
    """Expand and validate every trial (ConfigError, naming the key or flag, on the first problem)."""
    if not paths:
        raise ConfigError("sweep needs at least one config file")
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be at least 1")
    if metric is not None and not metric.startswith(METRIC_PREFIXES):
        raise ConfigError(f"--metric {metric!r}: trials report meta/*, inner/*, val/*, orchestrator/* and perf/* "
                          f"metrics, e.g. --metric {TRAINING_METRIC}")
    axes: list[Axis] = [parse_grid(g) for g in grid] + [parse_search(s) for s in search]
    bases = [load_config(p, list(overrides)) for p in paths]  # each file once, before any trial is built
    first = bases[0]
    name = name or default_name(first, [a.key for a in axes], len(paths))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    folder = Path(first.run.dir).resolve() / name
    uri = absolute_uri(resolve_uri(first))  # trials run in other folders (Tune moves them)
    experiment = experiment or experiment_name(first)
    fixed = {"run.dir": str(folder), "tracking.uri": uri, "tracking.experiment": experiment,
             "workers.address": first.workers.address}
    fixed = [f"{k}={json.dumps(v)}" for k, v in fixed.items()]  # JSON: a path with ': ' stays a string
    values = expand(axes, samples, first.run.seed)
    specs, errors = [], []
    for path, base in zip(paths, bases):
        for swept in values:
            if len(paths) > 1:
                swept = {"config": base.run.name, **swept}
            sets = [f"{k}={json.dumps(v)}" for k, v in swept.items() if k != "config"]
            try:
                specs.append((swept, _absolute_store(load_config(path, [*overrides, *sets, *fixed]))))
            except ConfigError as e:
                errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))
    for _, cfg in specs:
        _check_fits_a_trial(cfg)
    validating = all(cfg.eval.every for _, cfg in specs)
    metric = metric or (VALIDATION_METRIC if validating else TRAINING_METRIC)
    if metric.startswith("val/") and not validating:
        raise ConfigError(f"--metric {metric}: only trials that validate report it; set eval.every (e.g. "
                          f"--set eval.every=100) or compare on {TRAINING_METRIC}")
    names = trial_names([s for s, _ in specs], [c.run.name for _, c in specs])
    trials = [TrialSpec(n, s, cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": n})}))
              for n, (s, cfg) in zip(names, specs)]
    # Where the sweep runs (--address) is not what it is: a sweep continues on another cluster or embedded.
    what = [mask_secrets(o) for o in overrides if not o.startswith("workers.address=")]
    settings = {"configs": list(paths), "overrides": what, "search": list(search), "grid": list(grid),
                "samples": samples, "scheduler": scheduler, "metric": metric, "mode": mode,
                "trials": [t.name for t in trials]}
    return Plan(name, folder, trials, settings)


def default_name(first: Config, keys: list[str], configs: int) -> str:
    """A sweep's name when ``--name`` is not given: what it sweeps first, as MLflow's run table cuts long names
    at the end (``inner_lr-sweep_sine-maml``, ``sweep_sine-maml-and-2-more``), numbered ``-2``, ``-3`` where that
    folder already holds a sweep."""
    base = first.run.name if configs == 1 else f"{first.run.name}-and-{configs - 1}-more"
    name = "-".join([*(k.rsplit(".", 1)[-1] for k in dict.fromkeys(keys)), "sweep"]) + f"_{base}"
    folder, n = Path(first.run.dir).resolve(), 1
    while (folder / (numbered := name if n == 1 else f"{name}-{n}") / STATE).exists():
        n += 1
    return numbered


def trial_names(swept: list[dict[str, Any]], bases: list[str]) -> list[str]:
    """Run names that start with the swept values (MLflow's run table cuts long names at the end):
    ``inner_lr-0.01_outer.lr-0.001_sine-maml``; a trial number is added only where names would repeat."""
    keys = {k for s in swept for k in s}
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (k.rsplit(".", 1)[-1] if lasts.count(k.rsplit(".", 1)[-1]) == 1 else k) for k in keys}
    names = []
    for values, base in zip(swept, bases):
        parts = [_name_value(v) if k == "config" else f"{short[k]}-{_name_value(v)}" for k, v in values.items()]
        names.append("_".join([*parts, base] if "config" not in values else parts))
    if len(set(names)) < len(names):
        names = [f"{n}-t{i:02d}" for i, n in enumerate(names)]
    return names


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        text = "-".join(_name_value(x) for x in v)
    else:
        text = str(v)
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text) or "x"


def _check_fits_a_trial(cfg: Config) -> None:
    w = cfg.workers
    if w.max_workers is not None and w.max_workers > w.num_workers:
        raise ConfigError(f"workers.max_workers: {w.max_workers} > workers.num_workers={w.num_workers}; a sweep "
                          "trial's workers live in its placement group, sized from num_workers, and a worker "
                          "beyond it would wait for ever: leave max_workers out in sweeps")


def _absolute_store(cfg: Config) -> Config:
    store = getattr(cfg.task, "store", None)
    if not store or Path(store).is_absolute() or not Path(store).exists():
        return cfg  # (one that is not here may be on the cluster's nodes)
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"store": str(Path(store).resolve())})})
