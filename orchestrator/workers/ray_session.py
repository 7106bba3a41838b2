"""The Ray side of a run before any worker computes: joining or starting Ray, checking that the workers fit,
and shipping the image store to nodes that do not have it.

On one machine Ray starts embedded (bound to 127.0.0.1, no dashboard, token auth as Ray defaults, every Ray
process ended with the run: ``reaper``);
with ``workers.address`` the run joins a cluster. A store that is not on a node's filesystem is put
in the object store once and written to a node-local cache keyed by its content hash
(``local_store``), so a cluster needs no shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants, services

from orchestrator.atomic import write_atomic
from orchestrator.config import Config, ConfigError
from orchestrator.errors import one_line
from orchestrator.workers.reaper import MARK, Reaper

log = logging.getLogger("metaray")
_reaper: Reaper | None = None  # of the embedded Ray this process started; Ray itself is one per process too


class StoreMissing(FileNotFoundError):
    """The image store is not on this worker's node (no shared filesystem)."""


def connect(cfg: Config) -> bool:
    """Join the configured Ray cluster, or start Ray embedded; True when this call started it (``shutdown``)."""
    if ray.is_initialized():
        return False
    w = cfg.workers
    if w.address:
        try:
            with _loopback_only(_on_loopback(w.address)):
                ray.init(address=w.address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"workers.address: cannot connect to Ray at {w.address!r} ({one_line(e)}); start the "
                              "cluster or fix the address (none: Ray embedded on this machine)") from None
        return True
    # Embedded: reserve enough logical CPUs for every worker even on a small laptop (they then share cores).
    learner = w.learner_num_cpus if w.learner == "actor" else 0.0
    start_embedded(max(os.cpu_count() or 1, math.ceil(max(w.num_workers, w.max_workers or 0) * w.num_cpus + learner)))
    return True


def start_embedded(num_cpus: int) -> None:
    """Ray on this machine alone: every Ray process listens on 127.0.0.1 only (no dashboard; token auth as Ray
    defaults), and every one of them ends with this process, even one killed with SIGKILL (``reaper``)."""
    global _reaper
    _reaper = Reaper.start()
    marker = {MARK: _reaper.marker} if _reaper is not None else {}
    try:
        with _loopback_only(True, marker):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True, _node_ip_address="127.0.0.1")
    except BaseException:
        shutdown()
        raise


@contextlib.contextmanager
def _loopback_only(on: bool, env: dict[str, str] | None = None) -> Iterator[None]:
    """While Ray starts (or joins a session on this machine): its processes on 127.0.0.1 alone, with ``env``.

    Ray turns a node address of 127.0.0.1 into the machine's network address, and its servers then listen on
    every interface, unless multi-node clusters are off (its single-machine mode, the default on macOS and
    Windows). They are off while Ray starts, for the processes it starts (environment) and for this one, which
    imported Ray already (the constant), and on again after: a later session of this process may join a cluster.
    """
    env = {**({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"} if on else {}), **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = not on
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = True
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _on_loopback(address: str) -> bool:
    """Whether ``address`` (host:port, "auto", ray://...) is a Ray session on this machine's loopback."""
    try:
        found = services.get_ray_address_from_environment(address, None) if address == "auto" else address
        host = (services.parse_address(found.removeprefix("ray://")) or ("",))[0]
    except Exception:  # noqa: BLE001 - no local session: not one on loopback
        return False
    return host in ("127.0.0.1", "localhost", "::1")


def shutdown() -> None:
    """Shut down the Ray this process started (``connect``, ``start_embedded``) and what is left of it."""
    global _reaper
    if ray.is_initialized():
        ray.shutdown()
    if _reaper is not None:
        _reaper.stop()
        _reaper = None


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
        if self.shipped is None:
            from tasks.store import ImageStore  # pyarrow: only for image tasks

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
        if self._started:
            shutdown()
        self._started = False


def local_store(config: dict[str, Any], shipped: list | None) -> str | None:
    """The image store as this node sees it: None if the configured path is here, else a node-local copy of
    the bytes the learner shipped (written once per node, atomically); ``StoreMissing`` if none was shipped."""
    path = (config.get("task") or {}).get("store")
    if path is None or os.path.exists(path):
        return None
    if not shipped:
        raise StoreMissing(f"image store {path} is not on node {ray.get_runtime_context().get_node_id()[:8]}")
    from tasks.store import DataError, is_content_hash  # pyarrow: only for image tasks

    ref, content_hash = shipped
    if not is_content_hash(content_hash):  # it becomes a file name below
        raise DataError(f"task.store: refusing to cache a shipped store under the name {str(content_hash)[:80]!r}: "
                        "not a content hash (sha256:<64 hex digits>)")
    cache = Path(tempfile.gettempdir()) / "metaray-data" / f"{content_hash.replace(':', '-')}.arrow"
    if not cache.exists():
        write_atomic(cache, ray.get(ref))
    return str(cache)
