"""Sweeps on Ray Tune: ``tuner.sweep`` plans the trials (``plan``, ``search_space``), runs each as a normal run
inside a Tune trial (``trial``) and summarizes them in the parent MLflow run (``report``).

    from orchestrator.sweep.tuner import sweep
"""
