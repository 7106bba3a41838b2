"""How one task is learned and how the meta-parameters learn from it (models and algorithms).

Learners see only episodes and parameter dicts: no Ray, no MLflow.
"""
