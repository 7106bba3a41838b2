"""Where the central learner runs, decided once, above the recipe: in this process, or in its own Ray actor.

With ``workers.learner: actor`` the whole recipe (``recipe.train_here``) runs inside a Ray actor with its own
resources (a GPU where the model needs one) and the driver only waits: on a cluster whose head node runs no
work, a ``ray job submit`` entrypoint still runs on the head. Ctrl-C or SIGTERM in the driver tells the actor to
stop, which the learner sees at its next step boundary: it checkpoints, marks its MLflow run KILLED and stops.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from orchestrator.config import Config, parse_config
from orchestrator.errors import RunFailed
from orchestrator.run.interrupts import Interrupted, StopSignals
from orchestrator.run.recipe import TrainResult, train_here
from orchestrator.tracking.store import resolve_uri


def train(cfg: Config, resume: bool = False, evaluate: bool = True, out=None,
          parent_run_id: str | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Meta-train per ``cfg`` (continuing the run's checkpoint when ``resume``), evaluate, save, track.

    SIGINT/SIGTERM (or ``should_stop()`` turning true) stop at the next step boundary with a checkpoint.
    Progress and results are printed to ``out`` (None: ``sys.stdout`` as it is when printing).
    """
    if cfg.workers.learner == "actor":
        if cfg.tracking.enabled:
            resolve_uri(cfg)  # credentials in the URI go to the environment, before Ray starts the actor's process
        return _train_in_actor(cfg, resume, evaluate, parent_run_id)
    return train_here(cfg, resume, evaluate, out, parent_run_id, should_stop)


class LearnerActor:
    """``train_here`` inside a Ray actor (two calls at a time: ``train``, and the driver's ``stop`` while it runs).

    The stop is a flag the learner reads at its next step boundary, as it reads a signal in the driver; Ray's own
    cancellation would instead interrupt the step wherever it is, before the checkpoint."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def train(self, config: dict, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return train_here(parse_config(config), resume, evaluate, None, parent_run_id, should_stop=self._stop.is_set)

    def stop(self) -> None:
        self._stop.set()


def _train_in_actor(cfg: Config, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
    # Ray is imported here, not at the top: the in-process path runs where Ray is not installed.
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from orchestrator.workers.ray_session import connect, shutdown

    started = connect(cfg)
    w = cfg.workers
    actor = ray.remote(LearnerActor).options(num_cpus=w.learner_num_cpus, num_gpus=w.learner_num_gpus,
                                             max_concurrency=2).remote()
    ref = actor.train.remote(cfg.model_dump(mode="json"), resume, evaluate, parent_run_id)
    signals = StopSignals()
    try:
        with signals.installed(), signals.graceful_section():
            while not ray.wait([ref], timeout=0.5)[0]:
                if signals.requested:
                    actor.stop.remote()  # the learner checkpoints at the end of its current step, closes its run
                    try:
                        ray.get(ref, timeout=cfg.tracking.close_timeout_s + 60)
                    except (RayTaskError, RayActorError, ray.exceptions.GetTimeoutError):
                        pass  # it ends with the interruption we asked for
                    raise Interrupted(signals.signum)
        return ray.get(ref)
    except RayTaskError as e:
        raise e.cause from None  # e.g. a CheckpointError: the CLI reports it as a user error
    except RayActorError as e:
        raise RunFailed(f"the learner actor died ({type(e).__name__}); its last checkpoint is in {cfg.run_dir}: "
                        "continue with --resume") from None
    finally:
        ray.kill(actor)
        if started:
            shutdown()
