"""Where the central learner runs, decided once, above the recipe: in this process, or in its own Ray actor.

With ``workers.learner: actor`` the whole recipe (``recipe.train_here``) runs inside a Ray actor with its own
resources (a GPU where the model needs one) and the driver only waits: on a cluster whose head node runs no
work, a ``ray job submit`` entrypoint still runs on the head. Ctrl-C or SIGTERM in the driver cancels the
actor's call, which the learner sees at its next step boundary: it checkpoints, marks its MLflow run KILLED and
stops.
"""

from __future__ import annotations

import logging
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
    """``train_here`` inside a Ray actor; the driver's stop arrives as a cancellation of the call."""

    def train(self, config: dict, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
        import ray

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        # ray.cancel on a running method of a regular actor only raises a flag: polled once per meta-step.
        return train_here(parse_config(config), resume, evaluate, None, parent_run_id,
                          should_stop=lambda: ray.get_runtime_context().is_canceled())


def _train_in_actor(cfg: Config, resume: bool, evaluate: bool, parent_run_id: str | None) -> TrainResult:
    # Ray is imported here, not at the top: the in-process path runs where Ray is not installed.
    import ray
    from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError

    from orchestrator.workers.ray_session import connect, shutdown

    started = connect(cfg)
    w = cfg.workers
    actor = ray.remote(LearnerActor).options(num_cpus=w.learner_num_cpus, num_gpus=w.learner_num_gpus).remote()
    ref = actor.train.remote(cfg.model_dump(mode="json"), resume, evaluate, parent_run_id)
    signals = StopSignals()
    try:
        with signals.installed(), signals.graceful_section():
            while not ray.wait([ref], timeout=0.5)[0]:
                if signals.requested:
                    ray.cancel(ref)  # the learner checkpoints at the end of its current step, closes its run, stops
                    try:
                        ray.get(ref, timeout=cfg.tracking.close_timeout_s + 60)
                    except (RayTaskError, TaskCancelledError, RayActorError, ray.exceptions.GetTimeoutError):
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
