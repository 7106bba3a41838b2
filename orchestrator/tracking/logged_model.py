"""The run's model as an MLflow pyfunc folder: one task in (support inputs and labels, query inputs), the query
predictions after the algorithm's own adaptation out.

The folder holds θ (``theta.pt``, a tensor dict loaded with ``weights_only=True``), the blueprint the algorithm is
rebuilt from (``blueprint.json``, ``learners.predictor``), the code (``pyfunc_model.py`` and the ``learners`` and
``tasks`` packages under ``code/``), a signature with named tensors and the ``adaptation_steps`` parameter, and an
input example: one held-out task. ``mlflow.pyfunc.load_model`` runs it in any process with torch, numpy, pydantic
and MLflow, and ``mlflow models serve --env-manager local`` serves it; neither imports ``orchestrator``.

The LoggedModel is named after its run (``model_name``: MLflow refuses '.' and a few other characters in model
names, which run names such as a sweep trial's ``inner_lr-0.001_sine-maml`` hold).
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import learners
import tasks
from learners.params import Params
from learners.predictor import OWN_ADAPTATION, Blueprint

CODE = Path(__file__).with_name("pyfunc_model.py")  # run by MLflow on load; imports no orchestrator

# MLflow refuses these in a LoggedModel's name (mlflow.utils.validation._validate_logged_model_name).
_NOT_IN_MODEL_NAMES = "/:.%\"'"


def model_name(run_name: str) -> str:
    """The LoggedModel name for a run: the run's name with a decimal point written ``p`` (``lr-0p001``) and the
    other characters MLflow refuses in model names as ``_``."""
    name = re.sub(r"(?<=\d)\.(?=\d)", "p", run_name)
    return "".join("_" if c in _NOT_IN_MODEL_NAMES else c for c in name) or "model"


def example_task(batch, blueprint: Blueprint) -> dict[str, np.ndarray]:
    """The first task of an episode batch as the model's input; for images, one support and one query image
    per class, so that the example stays small."""
    sx, sy, qx = batch.support_x[0].numpy(), batch.support_y[0].numpy(), batch.query_x[0].numpy()
    if blueprint.image is not None:
        first = lambda y: np.array([int(np.flatnonzero(y == c)[0]) for c in np.unique(y)])  # noqa: E731
        sx, sy, qx = sx[first(sy)], sy[first(sy)], qx[first(batch.query_y[0].numpy())]
    return {"support_x": sx.astype(np.float32), "support_y": sy, "query_x": qx.astype(np.float32)}


def signature(blueprint: Blueprint):
    from mlflow.models import ModelSignature
    from mlflow.types import DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    x = (-1, *blueprint.x_shape)
    label = TensorSpec(np.dtype(np.int64), (-1,), "support_y") if blueprint.n_way else \
        TensorSpec(np.dtype(np.float32), (-1, 1), "support_y")
    inputs = Schema([TensorSpec(np.dtype(np.float32), x, "support_x"), label,
                     TensorSpec(np.dtype(np.float32), x, "query_x")])
    outputs = Schema([TensorSpec(np.dtype(np.int64), (-1,)) if blueprint.n_way else
                      TensorSpec(np.dtype(np.float32), (-1, 1))])
    params = ParamSchema([ParamSpec("adaptation_steps", DataType.long, OWN_ADAPTATION)])
    return ModelSignature(inputs, outputs, params)


def save(folder: Path, blueprint: Blueprint, params: Params, example: dict[str, np.ndarray]) -> None:
    """Write the pyfunc model folder ``folder`` (which must not exist or be empty)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        theta, spec = Path(tmp) / "theta.pt", Path(tmp) / "blueprint.json"
        torch.save({k: v.detach().cpu().contiguous() for k, v in params.items()}, theta)
        spec.write_text(json.dumps(blueprint.to_json(), indent=1))
        mlflow.pyfunc.save_model(
            str(folder), python_model=str(CODE), artifacts={"theta": str(theta), "blueprint": str(spec)},
            code_paths=[str(Path(learners.__file__).parent), str(Path(tasks.__file__).parent)],
            signature=signature(blueprint), input_example=example,
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in requirements(blueprint)])


def requirements(blueprint: Blueprint) -> list[str]:
    """The packages the model's code imports (cvxpylayers only for MetaOptNet's reference SVM solver)."""
    return ["torch", "numpy", "pydantic", "mlflow",
            *(["cvxpylayers"] if blueprint.algorithm.get("solver") == "cvxpylayers" else [])]
