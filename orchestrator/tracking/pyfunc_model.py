"""The logged model's code (MLflow "models from code"): copied into the model folder, run when MLflow loads it.

Imports only MLflow, numpy, torch and the ``learners`` and ``tasks`` packages that the model folder carries
(``code/``), never ``orchestrator``: a model loads wherever those packages and torch are installed.

``predict`` takes one task, ``{"support_x", "support_y", "query_x"}`` (arrays), and returns the query
predictions after the algorithm's own adaptation; ``params={"adaptation_steps": k}`` (k >= 0) instead
fine-tunes k steps from the task model before adaptation, as ``metaray eval`` scores it after k steps.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from learners.predictor import OWN_ADAPTATION, Blueprint, Predictor


class FewShotModel(PythonModel):
    def load_context(self, context) -> None:
        with open(context.artifacts["blueprint"]) as f:
            blueprint = Blueprint.from_json(json.load(f))
        theta = torch.load(context.artifacts["theta"], weights_only=True, map_location="cpu")
        self.predictor = Predictor.build(blueprint, theta)

    def answer(self, context, model_input, params=None) -> np.ndarray:
        if not isinstance(model_input, dict) or not {"support_x", "support_y", "query_x"} <= set(model_input):
            raise ValueError("the input is one task: {'support_x': [...], 'support_y': [...], 'query_x': [...]}")
        steps = int((params or {}).get("adaptation_steps", OWN_ADAPTATION))
        return self.predictor.predict(model_input["support_x"], model_input["support_y"], model_input["query_x"],
                                      None if steps == OWN_ADAPTATION else steps)


# ``predict`` is set after the class is made: MLflow inspects a PythonModel's predict for type hints when the class
# is made, and warns on every load when it has none; the input here is a dict of named tensors, which its type
# hints cannot express, and which the model's signature describes.
FewShotModel.predict = FewShotModel.answer

mlflow.models.set_model(FewShotModel())
