"""One run end to end: ``launch`` (the learner here or in its own Ray actor) -> ``recipe`` (setup, train,
evaluate, close) over the ``central_learner`` (θ, the outer optimizer, one synchronous meta-step), with
``checkpoint``, ``selection`` (validation, the best checkpoint), ``evaluation`` (held-out episodes, the report)
and ``interrupts`` (SIGINT/SIGTERM at a step boundary).
"""
