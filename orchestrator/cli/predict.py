"""``metaray predict``: classify a folder of images with a logged model, after it adapts to a support set.

    metaray predict models:/omniglot-protonet/1 --support support/ --query query/
    metaray predict runs:/RUN_ID/model --support support/ --query query/ --steps 10

The support set is a folder in the ImageFolder layout (``support/<class>/*.png|jpg``, one folder per class,
as many classes as the model's tasks had); the query set is a folder of images. Images are made what the model
was trained on (greyscale or RGB, resized, inverted for Omniglot, scaled to [0, 1]), the model adapts on the
support set (the algorithm's own adaptation, or ``--steps`` fine-tuning steps as evaluation scores them), and
one line per query image says ``FILE<TAB>CLASS``. The model is an MLflow pyfunc logged by ``metaray train``
(``orchestrator/tracking/logged_model.py``); the store is ``$MLFLOW_TRACKING_URI`` (default sqlite:///mlflow.db).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from orchestrator.errors import one_line
from orchestrator.tracking.store import DEFAULT_URI, TrackingError
from tasks.store import DataError

IMAGES = (".png", ".jpg", ".jpeg")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify a folder of images with a logged model, after it adapts "
                                              "to a support set of labelled images")
    p.add_argument("model", help="the model: models:/NAME/VERSION, runs:/RUN_ID/model, models:/MODEL_ID or a folder")
    p.add_argument("--support", required=True, metavar="DIR", help="labelled images: DIR/<class>/*.png|jpg")
    p.add_argument("--query", required=True, metavar="DIR", help="the images to classify: DIR/*.png|jpg")
    p.add_argument("--steps", type=int, metavar="K", help="fine-tune K steps on the support set instead of the "
                                                          "algorithm's own adaptation (as metaray eval scores it)")
    p.add_argument("--uri", help=f"tracking store (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")


def run(args: argparse.Namespace, out=None) -> int:
    model = load(args.model, args.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    blueprint = model.unwrap_python_model().predictor.blueprint
    if blueprint.image is None:
        raise DataError(f"{args.model} is a {blueprint.algorithm['name']} model of sine tasks, not of images; "
                        "call it with mlflow.pyfunc (support_x, support_y, query_x)")
    classes, support = support_set(Path(args.support))
    queries = image_files(Path(args.query), "--query")
    sx = np.stack([read(p, blueprint.image) for p, _ in support])
    sy = np.array([label for _, label in support], dtype=np.int64)
    qx = np.stack([read(p, blueprint.image) for p in queries])
    params = {} if args.steps is None else {"adaptation_steps": args.steps}
    try:
        labels = model.predict({"support_x": sx, "support_y": sy, "query_x": qx}, params=params)
    except Exception as e:  # noqa: BLE001 - the model's own message (e.g. too many classes) on one line
        raise DataError(f"{args.support}: {one_line(getattr(e, '__cause__', None) or e, 300)}") from None
    for path, label in zip(queries, labels):
        print(f"{path}\t{classes[int(label)]}", file=out or sys.stdout)
    return 0


def load(uri: str, store: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise TrackingError(f"{uri}: cannot load this model from {store} ({one_line(e, 240)}); give a model "
                            "logged by metaray train, e.g. models:/NAME/1") from None


def support_set(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted) and (image, class index) pairs of an ImageFolder-layout folder."""
    if not folder.is_dir():
        raise DataError(f"--support {folder}: no such folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"--support {folder}: no class folders; give DIR/<class>/*.png|jpg (ImageFolder layout)")
    pairs = [(p, i) for i, c in enumerate(classes) for p in image_files(folder / c, "--support")]
    return classes, pairs


def image_files(folder: Path, flag: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGES)
    if not files:
        raise DataError(f"{flag} {folder}: no .png or .jpg images in it")
    return files


def read(path: Path, image: dict) -> np.ndarray:
    """An image file as the model's input: [C, H, W] float32 in [0, 1], made as the training store's images."""
    from tasks.converters.convert import UNREADABLE, decode

    channels, height, width = image["shape"]
    try:
        pixels = decode(path.read_bytes(), "L" if channels == 1 else "RGB", (height, width), image["invert"])
    except UNREADABLE as e:
        raise DataError(f"{path}: not a readable image ({one_line(e, 120)})") from None
    return pixels.astype(np.float32) / np.float32(255)
