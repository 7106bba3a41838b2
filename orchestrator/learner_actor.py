"""The central learner as its own Ray actor (``workers.learner: actor``).

On a cluster whose head node runs no work, a ``ray job submit`` entrypoint still runs on the head.
The whole of ``train`` then runs inside an actor that has its own resources (a GPU where the model
needs one); the driver only waits. Ctrl-C or SIGTERM in the driver cancels the actor's call, which
the learner sees at its next step boundary: it checkpoints, marks its MLflow run KILLED and stops.
"""

from __future__ import annotations

import logging

from orchestrator.config import Config, parse_config
from orchestrator.errors import RunFailed
from orchestrator.interrupts import Interrupted, StopSignals
from orchestrator.ray_session import connect


class LearnerActor:
    def train(self, config: dict, resume: bool, evaluate: bool, parent_run_id: str | None):
        import ray

        from orchestrator.run import train_here

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        # ray.cancel on a running method of a regular actor only raises a flag: polled once per meta-step.
        return train_here(parse_config(config), resume, evaluate, None, parent_run_id,
                          should_stop=lambda: ray.get_runtime_context().is_canceled())


def train_in_actor(cfg: Config, resume: bool, evaluate: bool, parent_run_id: str | None):
    import ray
    from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError

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
        raise e.as_instanceof_cause() from None  # e.g. a CheckpointError: the CLI reports it as a user error
    except RayActorError as e:
        raise RunFailed(f"the learner actor died ({type(e).__name__}); its last checkpoint is in {cfg.run_dir}: "
                        "continue with --resume") from None
    finally:
        ray.kill(actor)
        if started:
            ray.shutdown()
