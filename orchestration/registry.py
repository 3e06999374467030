"""The MLflow model registry: one registered model per dataset, alias ``best`` on the winner.

At the end of a sweep, each dataset's best trial becomes a new version of
``autoassign-<dataset>``: its checkpoint (the library's own file, with its resolved config
inside) is logged to the trial's run as an MLflow model with a signature (``model/``, see
:mod:`orchestration.mlflow_model`) and the version points there. The
alias ``best`` moves to the new version only when its ranking metric beats the version that
holds it now; a worse sweep never demotes a better model. Each version records the
comparison in its ``autoassign.best_comparison`` tag.

    python -m orchestration.registry load autoassign-coco@best --out model/
    python -m orchestration.registry predict autoassign-coco@best images/ --out predictions/

Both also take ``NAME/VERSION`` and ``models:/`` URIs. :func:`load_detector` gives back a
ready :class:`autoassign.predict.Predictor`. ``python -m autoassign.predict
models:/autoassign-coco@best IMAGES`` works too: the library never imports MLflow, but this
package registers :func:`resolve_model_uri` for the ``models`` scheme
(:mod:`autoassign.checkpoint_sources`). ``mlflow.pyfunc.load_model`` loads a version as well.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.engine.checkpoint import CHECKPOINT_FILE
from autoassign.errors import CheckpointError
from orchestration.tracking import TAG_DATASET, TAG_METRIC, TAG_SWEEP_ID

MODEL_PREFIX = "autoassign-"
BEST_ALIAS = "best"
ARTIFACT_FOLDER = "model"
TAG_VALUE = "autoassign.metric_value"
TAG_COMPARISON = "autoassign.best_comparison"


class RegistryError(CheckpointError):
    """A model reference that names nothing in the registry, or a version without files."""


@dataclass(frozen=True)
class Registration:
    model: str
    version: str
    value: float
    became_best: bool
    comparison: str


def model_name(dataset: str) -> str:
    return f"{MODEL_PREFIX}{dataset}"


def register_best(
    client: Any, rows: list[dict[str, Any]], *, storage: Any, sweep_id: str
) -> list[Registration]:
    """Register each leaderboard row's checkpoint as a version of its dataset's model."""
    from orchestration.mlflow_model import save_detector_model

    registered = []
    for row in rows:
        if row.get("status") != "ok" or not row.get("checkpoint") or not row.get("run_id"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.download_file(
                f"{row['checkpoint'].rstrip('/')}/{CHECKPOINT_FILE}", Path(tmp) / CHECKPOINT_FILE
            )
            model = save_detector_model(local, Path(tmp) / ARTIFACT_FOLDER)
            client.log_artifacts(row["run_id"], str(model), ARTIFACT_FOLDER)
        registered.append(
            register_version(
                client,
                model_name(row["dataset"]),
                run_id=row["run_id"],
                metric=row["metric"],
                value=float(row["value"]),
                tags={TAG_SWEEP_ID: sweep_id, TAG_DATASET: row["dataset"]},
            )
        )
    return registered


def register_version(
    client: Any,
    name: str,
    *,
    run_id: str,
    metric: str,
    value: float,
    tags: dict[str, str] | None = None,
) -> Registration:
    """A new version of ``name`` from the run's ``model/`` artifacts; ``best`` moved if it wins."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description=f"AutoAssign detectors, ranked by {metric}"
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(run_id)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{ARTIFACT_FOLDER}",
        run_id=run_id,
        tags={TAG_METRIC: metric, TAG_VALUE: repr(value), **(tags or {})},
        description=f"{metric} = {value:.4f}",
    )
    current = _version_with_alias(client, name, BEST_ALIAS)
    current_value = _value_of(current) if current is not None else None
    if current is None:
        became_best, comparison = True, f"{metric} {value:.4f}: first version, now best"
    elif current_value is None or value > current_value:
        became_best = True
        comparison = (
            f"{metric} {value:.4f} > {current_value if current_value is not None else 'unknown'}"
            f" of version {current.version}: now best"
        )
    else:
        became_best = False
        comparison = (
            f"{metric} {value:.4f} <= {current_value:.4f} of version {current.version}, "
            "which stays best"
        )
    if became_best:
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    client.set_model_version_tag(name, version.version, TAG_COMPARISON, comparison)
    return Registration(name, str(version.version), value, became_best, comparison)


def _version_with_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _value_of(version: Any) -> float | None:
    try:
        value = float(version.tags.get(TAG_VALUE, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---- loading ---------------------------------------------------------------------------------


def resolve_version(client: Any, reference: str) -> Any:
    """The model version of ``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (its latest)."""
    from mlflow.exceptions import MlflowException

    ref = reference.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{ref}'")
        if versions:
            return max(versions, key=lambda v: int(v.version))
    except MlflowException:
        pass
    known = sorted(m.name for m in client.search_registered_models())
    raise RegistryError(
        f"{reference}: no such registered model version (use NAME@ALIAS or NAME/VERSION); "
        f"registered models: {', '.join(known) or '(none)'}"
    )


def download(client: Any, reference: str, destination: Path) -> Path:
    """The version's checkpoint file, downloaded (with its MLflow model) under ``destination``."""
    import mlflow

    from orchestration.mlflow_model import checkpoint_in

    version = resolve_version(client, reference)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=version.source,
            dst_path=str(destination),
            tracking_uri=client.tracking_uri,
        )
    )
    checkpoint = checkpoint_in(local) if local.is_dir() else local
    if checkpoint is None or not checkpoint.is_file():
        raise RegistryError(f"{reference}: version {version.version} has no {CHECKPOINT_FILE}")
    return checkpoint


def download_to_temp(reference: str, tracking_uri: str | None = None) -> Path:
    """The version's checkpoint file, downloaded to a new temporary folder (the registry at
    ``tracking_uri``, default ``MLFLOW_TRACKING_URI``)."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="autoassign-model-"))
    return download(MlflowClient(tracking_uri), reference, folder)


def resolve_model_uri(uri: str) -> Path:
    """The ``models`` resolver of :mod:`autoassign.checkpoint_sources`: the checkpoint of
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` from the registry at
    ``MLFLOW_TRACKING_URI``."""
    return download_to_temp(uri)


def load_detector(reference: str, *, tracking_uri: str | None = None, device: str = "auto"):
    """A ready :class:`autoassign.predict.Predictor` for a registered model version."""
    from autoassign.predict import Predictor

    return Predictor(download_to_temp(reference, tracking_uri), device=device)


# ---- CLI -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.registry",
        description="Fetch or run a registered AutoAssign model (NAME@ALIAS or NAME/VERSION).",
    )
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="download the checkpoint and describe it")
    load.add_argument("model")
    load.add_argument("--out", type=Path, default=Path("model"))
    predict = commands.add_parser("predict", help="run it with python -m autoassign.predict")
    predict.add_argument("model")
    predict.add_argument("rest", nargs=argparse.REMAINDER, help="autoassign.predict arguments")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    args = parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    try:
        if args.command == "load":
            checkpoint = download(client, args.model, args.out)
            from autoassign.predict import Predictor

            detector = Predictor(checkpoint, device="cpu")
            print(
                f"{args.model}: {checkpoint} ({len(detector.class_names)} classes, "
                f"ResNet-{detector.config.model.backbone.depth}, input "
                f"{detector.config.model.input.min_size} px)"
            )
            return 0
        from autoassign import predict

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = download(client, args.model, Path(tmp))
            return predict.main([str(checkpoint), *args.rest])
    except (RegistryError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
