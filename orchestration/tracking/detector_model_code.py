"""The code of every registered AutoAssign model (MLflow's models-from-code).

MLflow copies this file into each model folder and runs it when the model is loaded, so
loading unpickles nothing: the model is :class:`orchestration.tracking.mlflow_model.DetectorModel`,
built from the project that is installed where it loads, around the version's checkpoint
artifact. Nothing imports this module.
"""

import mlflow.models

from orchestration.tracking.mlflow_model import DetectorModel

mlflow.models.set_model(DetectorModel())
