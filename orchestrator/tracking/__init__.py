"""MLflow tracking that never stops training and loses nothing.

``open_tracker`` opens the learner's tracker (``NullTracker`` with tracking off, which never imports MLflow);
``tracker`` (MLflow's) appends metrics to the run's ``metric_log`` on disk and artifacts to its ``artifact_queue``;
a ``writer`` process sends them (``delivery``, which also holds the offline
``deliver``/``register`` commands); ``store`` knows the local SQLite file; ``system_metrics`` samples CPU, memory
and GPUs; ``plots`` draws the run's figures; ``logged_model`` writes the run's model as an MLflow pyfunc, whose own
code is ``pyfunc_model``.
"""
