"""Who computes a meta-step: TaskWorker actors behind one group.

``group`` (``make_group``: the Ray ``WorkerGroup`` or the in-process ``LocalGroup``) -> ``share_scheduler`` (every
share exactly once, on whichever worker is free) -> ``actor_pool`` (actor lifetimes, probes, restarts) ->
``worker`` (``TaskWorker``: samples its episodes, returns their summed meta-gradient). ``messages`` are the types
that cross the Ray boundary and the exact reduction; ``ray_session`` starts or joins Ray; ``faults`` counts faults
and rehearses them.
"""
