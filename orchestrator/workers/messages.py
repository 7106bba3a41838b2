"""The messages between the central learner and its workers, and the pure reduction of their results.

Learner -> worker: flat float32 θ and ``EpisodeIds``, in a ``ShareCall``. θ up to ``INLINE_BYTES`` travels as bytes inside
each call; a larger one is one object-store ref per step.
Worker -> learner: ``TaskResult``, the summed meta-gradient of its share (``EvalResult`` when evaluating).
``aggregate`` turns the results of one step into the mean meta-gradient.

Small arrays cross as bytes because Ray's zero-copy path for numpy arrays (out-of-band buffers) has a
fixed cost per array that, for the sine model's 7 KB, is larger than copying them (~0.5 ms a call each
way on a 2-core machine, benchmarks/throughput.py); large arrays keep it.

Between processes, episode ids and a share's result travel as plain tuples (``ids_message``,
``TaskResult.message``, read back with ``ids_of`` and ``received``): Ray sends tuples of numbers, strings
and bytes with msgpack, but pickles any other object with cloudpickle, whose Python-level pickler cost
~40-120 us per EpisodeIds and ~150 us per TaskResult against ~15-25 us as tuples (measured on a 2-core
machine), on both sides of every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from tasks.episode import EpisodeIds, Purpose

INLINE_BYTES = 64 * 1024  # below Ray's 100 KiB limit for arguments and results passed inside a call


def theta_message(theta: np.ndarray) -> bytes | np.ndarray:
    """θ as the calls carry it: bytes when small (read back with ``theta_array``), else the array itself."""
    return theta.tobytes() if theta.nbytes <= INLINE_BYTES else theta


def theta_array(theta: bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(theta, dtype=np.float32) if isinstance(theta, bytes) else theta


def ids_message(ids: EpisodeIds) -> tuple:
    """Episode ids as a call carries them (read back with ``ids_of``)."""
    return ids.seed, ids.step, ids.indices, int(ids.purpose)


def ids_of(message: EpisodeIds | tuple | list) -> EpisodeIds:
    """The ``EpisodeIds`` of ``ids_message`` (msgpack may have turned its tuples into lists), or the ids given."""
    if isinstance(message, EpisodeIds):
        return message
    seed, step, indices, purpose = message
    return EpisodeIds(seed, step, tuple(indices), Purpose(purpose))


@dataclass(frozen=True)
class ShareCall:
    """One share's call on whichever worker takes it: ``worker.<method>(*args)``. With ``returns`` > 1 the first
    return is what the scheduler waits for, the others stay where they were computed (``meta_gradient_parts``)."""

    method: str
    args: tuple
    returns: int = 1


@dataclass(frozen=True)
class TaskResult:
    """One worker's share of a meta-step: sums over its kept tasks."""

    grad: np.ndarray  # flat float32, SUM over kept tasks (empty when it stays on the worker's node for a reducer)
    stats: dict[str, float]  # SUMS over kept tasks, e.g. loss_before, loss_after, acc_after
    tasks: int  # kept tasks
    dropped: int  # tasks dropped for non-finite values
    compute_s: float = 0.0
    worker: int = 0
    incarnation: str = ""  # changes when the actor process is restarted
    node: str = ""  # the Ray node that computed it (where its gradient lies for a node reducer)
    peak_mb: float = 0.0  # the worker's peak GPU memory so far (reserved by torch's allocator); 0 on a CPU

    def on_node(self, node: str) -> "TaskResult":
        return replace(self, node=node)

    def message(self) -> tuple:
        """This result as a worker returns it to another process (read back with ``received``)."""
        grad = self.grad if self.grad.nbytes > INLINE_BYTES else self.grad.tobytes()
        return (_TASK_RESULT, grad, self.grad.dtype.str, *(getattr(self, f.name) for f in fields(self)[1:]))

    def __reduce__(self):
        rest = tuple(getattr(self, f.name) for f in fields(self)[1:])
        if self.grad.nbytes > INLINE_BYTES:
            return TaskResult, (self.grad, *rest)
        return _task_result, (self.grad.tobytes(), self.grad.dtype.str, *rest)


def _task_result(grad: bytes, dtype: str, *rest) -> TaskResult:
    return TaskResult(np.frombuffer(grad, dtype=dtype), *rest)


_TASK_RESULT = "metaray.TaskResult"


def received(value: Any) -> Any:
    """What a worker's call returned: a ``TaskResult`` from its ``message``; anything else as it came."""
    if isinstance(value, (tuple, list)) and value and value[0] == _TASK_RESULT:
        _, grad, dtype, stats, *rest = value
        grad = grad if isinstance(grad, np.ndarray) else np.frombuffer(grad, dtype=dtype)
        return TaskResult(grad, dict(stats), *rest)
    return value


@dataclass(frozen=True)
class EvalResult:
    """One worker's share of an evaluation: per-episode curves ``{metric: [episodes, steps + 1]}``."""

    curves: dict[str, np.ndarray]
    incarnation: str = ""


@dataclass(frozen=True)
class CallTiming:
    """Where the wall time of one group call went (seconds)."""

    put_s: float = 0.0
    wait_s: float = 0.0  # dispatch + remote compute + fetching results
    gathered_bytes: int = 0  # gradient bytes the learner received


@dataclass(frozen=True)
class Aggregate:
    grad: np.ndarray | None  # mean over kept tasks; None when every task was dropped
    stats: dict[str, float]  # means over kept tasks
    tasks: int
    dropped: int
    compute_s: float = 0.0  # the slowest share's compute
    timing: CallTiming = field(default_factory=CallTiming)
    peak_mb: float = 0.0  # the largest peak GPU memory of the workers that computed the shares


def sum_grads(grads: list[np.ndarray]) -> np.ndarray:
    """Sum in float64. Float64 addition is not associative either, but its rounding (~1e-16 relative) is far
    below float32's, so the float32 mean almost never depends on how the shares were grouped (share by
    share here, node by node in ``group.NodeReducer``): flat and node-reduced runs are tested bit-identical."""
    total = np.zeros(grads[0].shape, dtype=np.float64)
    for g in grads:
        total += g
    return total


def aggregate(results: list[TaskResult], partial_sums: list[np.ndarray] | None = None,
              timing: CallTiming = CallTiming()) -> Aggregate:
    """Sum the shares' gradients (or the per-node ``partial_sums`` of them), divide by the kept tasks."""
    tasks = sum(r.tasks for r in results)
    dropped = sum(r.dropped for r in results)
    compute_s = max((r.compute_s for r in results), default=0.0)
    peak_mb = max((r.peak_mb for r in results), default=0.0)
    if tasks == 0:
        return Aggregate(None, {}, 0, dropped, compute_s, timing, peak_mb)
    total = sum_grads(partial_sums if partial_sums is not None else [r.grad for r in results])
    keys = sorted({k for r in results for k in r.stats})
    stats = {k: sum(r.stats.get(k, 0.0) for r in results) / tasks for k in keys}
    return Aggregate((total / tasks).astype(np.float32), stats, tasks, dropped, compute_s, timing, peak_mb)
