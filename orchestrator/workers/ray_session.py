"""The Ray side of a run before any worker computes: joining or starting Ray, checking that the workers fit,
and shipping the image store to nodes that do not have it.

On one machine Ray starts embedded (bound to 127.0.0.1, no dashboard, token auth as Ray defaults);
with ``workers.address`` the run joins a cluster. A store that is not on a node's filesystem is put
in the object store once and written to a node-local cache keyed by its content hash
(``local_store``), so a cluster needs no shared filesystem.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import ray

from orchestrator.atomic import write_atomic
from orchestrator.config import Config, ConfigError
from orchestrator.errors import one_line

log = logging.getLogger("metaray")


class StoreMissing(FileNotFoundError):
    """The image store is not on this worker's node (no shared filesystem)."""


def connect(cfg: Config) -> bool:
    """Join the configured Ray cluster, or start Ray embedded; True when this call started it."""
    if ray.is_initialized():
        return False
    w = cfg.workers
    if w.address:
        try:
            ray.init(address=w.address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"workers.address: cannot connect to Ray at {w.address!r} ({one_line(e)}); start the "
                              "cluster or fix the address (none: Ray embedded on this machine)") from None
        return True
    # Embedded: reserve enough logical CPUs for every worker even on a small laptop (they then share cores).
    learner = w.learner_num_cpus if w.learner == "actor" else 0.0
    cpus = max(os.cpu_count() or 1, math.ceil(max(w.num_workers, w.max_workers or 0) * w.num_cpus + learner))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, _node_ip_address="127.0.0.1")
    return True


class RaySession:
    """Ray for one run: connected (or started) at construction, shut down at ``close`` if this run started it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._started = connect(cfg)
        self._store = getattr(cfg.task, "store", None)
        self.shipped: list | None = None  # [object ref of the store's bytes, content hash] once shipped
        try:
            self._check_capacity()
        except ConfigError:
            self.close()
            raise

    def _check_capacity(self) -> None:
        """Fail fast when the workers can never be placed (a fixed cluster too small for them); on an
        autoscaling cluster the missing nodes may still come, so only warn."""
        w, total = self.cfg.workers, ray.cluster_resources()
        actor = w.learner == "actor"
        short = [f"{w.num_workers} x {need:g} {kind}{' + the learner' if actor and learner else ''} > "
                 f"{total.get(kind, 0):g} in the cluster"
                 for kind, need, learner in (("CPU", w.num_cpus, w.learner_num_cpus),
                                             ("GPU", w.num_gpus, w.learner_num_gpus))
                 if w.num_workers * need + (learner if actor else 0) > total.get(kind, 0) + 1e-9]
        if not short:
            return
        message = f"workers do not fit: {'; '.join(short)}; lower workers.num_workers or workers.num_cpus/num_gpus"
        if w.address is None:  # Ray embedded on this machine: no node will ever join
            raise ConfigError(message)
        log.warning("%s (waiting: an autoscaler may add nodes)", message)

    def ship_store(self) -> list:
        """Put the image store in the object store (once) for nodes that lack it: [ref, content hash]."""
        from tasks.store import ImageStore

        if self.shipped is None:
            content_hash = ImageStore.open(self._store).content_hash
            log.warning("image store %s is not on every node: shipping it through the object store", self._store)
            self.shipped = [ray.put(Path(self._store).read_bytes()), content_hash]
        return self.shipped

    def free_workers(self) -> int:
        """How many more workers the cluster has room for now (elastic growth)."""
        w, free = self.cfg.workers, ray.available_resources()
        room = math.floor(free.get("CPU", 0.0) / w.num_cpus + 1e-9)
        if w.num_gpus:
            room = min(room, math.floor(free.get("GPU", 0.0) / w.num_gpus + 1e-9))
        return room

    def resources(self) -> dict[str, Any]:
        total = ray.cluster_resources()
        return {"resources.cluster_cpus": total.get("CPU", 0), "resources.cluster_gpus": total.get("GPU", 0),
                "resources.nodes": sum(n["Alive"] for n in ray.nodes())}

    def close(self) -> None:
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False


def local_store(config: dict[str, Any], shipped: list | None) -> str | None:
    """The image store as this node sees it: None if the configured path is here, else a node-local copy of
    the bytes the learner shipped (written once per node, atomically); ``StoreMissing`` if none was shipped."""
    path = (config.get("task") or {}).get("store")
    if path is None or os.path.exists(path):
        return None
    if not shipped:
        raise StoreMissing(f"image store {path} is not on node {ray.get_runtime_context().get_node_id()[:8]}")
    ref, content_hash = shipped
    cache = Path(tempfile.gettempdir()) / "metaray-data" / f"{content_hash.replace(':', '-')}.arrow"
    if not cache.exists():
        write_atomic(cache, ray.get(ref))
    return str(cache)
