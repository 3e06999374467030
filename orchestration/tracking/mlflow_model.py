"""A detector checkpoint as an MLflow model: a ``python_function`` flavour with a signature.

The checkpoint's config says which detector it holds (``model.kind``: AutoAssign or the FCOS
baseline); both load and predict alike.

Each registered version's ``model/`` folder is an MLflow model:

    model/
      MLmodel                   flavour, signature, parameters, requirements
      detector_model_code.py    the model's code: a :class:`DetectorModel` (models-from-code,
                                so loading unpickles nothing)
      artifacts/checkpoint.pt   the library's checkpoint, its resolved config inside
      requirements.txt ...

so the MLflow UI shows the model's signature, and
``mlflow.pyfunc.load_model("models:/autoassign-coco@best").predict(image)`` runs it in any
environment where this project is installed. The library's own loaders only need
``artifacts/checkpoint.pt`` (:func:`checkpoint_in`).

Signature: input one image, a ``[H, W, 3]`` uint8 RGB array; output one row per detection,
``x1, y1, x2, y2`` (pixels of that image, continuous coordinates), ``score``, ``label`` (class
index) and ``class_name``; parameter ``score_threshold`` (default: the model's own).
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from autoassign.engine.checkpoint import CHECKPOINT_FILE

CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_CODE = Path(__file__).with_name("detector_model_code.py")
OUTPUT_COLUMNS = ("x1", "y1", "x2", "y2", "score", "label", "class_name")

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
    outputs=Schema(
        [ColSpec("double", name) for name in ("x1", "y1", "x2", "y2", "score")]
        + [ColSpec("long", "label"), ColSpec("string", "class_name")]
    ),
    params=ParamSchema([ParamSpec("score_threshold", "double", 0.0)]),
)


class DetectorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: rebuilds the detector from the checkpoint artifact on load."""

    def load_context(self, context: Any) -> None:
        from autoassign.predict import Predictor

        self.predictor = Predictor(Path(context.artifacts[CHECKPOINT_ARTIFACT]), device="auto")

    # An ndarray input hint is one MLflow infers no schema from: the stated SIGNATURE stays.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Detections of one ``[H, W, 3]`` uint8 image as a DataFrame (see the signature)."""
        import torch

        image = np.asarray(model_input)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected one [H, W, 3] uint8 RGB image, got shape {image.shape}")
        output = self.predictor.detect(
            torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        )
        threshold = (params or {}).get("score_threshold", 0.0)
        keep = output["scores"] >= float(threshold)
        boxes = output["boxes"][keep].double().numpy().reshape(-1, 4)
        labels = output["labels"][keep].numpy().astype(np.int64)
        names = self.predictor.class_names
        return pd.DataFrame(
            {
                "x1": boxes[:, 0],
                "y1": boxes[:, 1],
                "x2": boxes[:, 2],
                "y2": boxes[:, 3],
                "score": output["scores"][keep].double().numpy(),
                "label": labels,
                "class_name": [names[int(label)] for label in labels],
            },
            columns=list(OUTPUT_COLUMNS),
        )


def save_detector_model(checkpoint: Path, destination: Path) -> Path:
    """Write the MLflow model folder ``destination`` (must not exist) around ``checkpoint``."""
    with warnings.catch_warnings():
        # An input example would make MLflow load the detector here just to check it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(
            path=str(destination),
            python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=SIGNATURE,
            # Stated, not inferred: inference would load the model in a subprocess.
            pip_requirements=_requirements(),
        )
    return destination


def checkpoint_in(model_folder: Path) -> Path | None:
    """The checkpoint file inside a downloaded model folder (or a plain checkpoint folder)."""
    for candidate in (model_folder / "artifacts" / CHECKPOINT_FILE, model_folder / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    return None


def _requirements() -> list[str]:
    pins = []
    for package in ("autoassign-ray", "torch", "torchvision", "mlflow"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins
