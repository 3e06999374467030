"""The tags and names the platform gives MLflow runs, experiments and views."""

from __future__ import annotations

TAG_SWEEP_ID = "autoassign.sweep_id"


TAG_TRIAL_ID = "autoassign.trial_id"


TAG_DATASET = "autoassign.dataset"


TAG_FORMAT = "autoassign.format"  # the dataset's on-disk format, hence its protocol


TAG_METRIC = "autoassign.metric"  # the metric that ranks the dataset's trials


TAG_CHECKPOINT = "autoassign.checkpoint_uri"


TAG_KIND = "autoassign.kind"  # "sweep" or "trial"


TAG_FAILURE = "autoassign.failure_reason"


TAG_FAILURE_FINAL = "autoassign.failure_final"


TAG_FAILURE_LAUNCH = "autoassign.failure_launch"


TAG_EARLY_STOPPED = "autoassign.early_stopped"


TAG_PARENT = "mlflow.parentRunId"


TAG_RUN_NAME = "mlflow.runName"


TAG_EXPERIMENT_KIND = "mlflow.experimentKind"


MODEL_TRAINING_KIND = "custom_model_development"


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."


VIEW_URL_PARAMETER = "viewStateShareKey"


RUNS_VIEW_KEY = "autoassign-sweep"
