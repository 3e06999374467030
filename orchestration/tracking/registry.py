"""The MLflow model registry: one registered model per dataset, alias ``best`` on the winner.

At the end of a sweep, each dataset's best trial becomes a new version of
``autoassign-<dataset>``: its checkpoint (the library's own file, with its resolved config
inside) is logged to the trial's run as an MLflow model with a signature (``model/``, see
:mod:`orchestration.tracking.mlflow_model`) and the version points there.

**Identity.** A metric value only means something next to values of the same data: the same
format, class names, evaluation split and ranking metric. Each version records that
*identity*, read from its checkpoint (not from the dataset's name in the sweep config), as
the tags ``autoassign.identity`` (readable json) and ``autoassign.identity_key`` (a short
hash). A registered model holds one identity, the one it was created with (tags
``autoassign.identity_key`` and ``autoassign.identity_summary``). A version of another
identity is refused with a message naming both: two sweeps that give unrelated data the same
dataset name (the synthetic demo's 6-class "coco" and a real 80-class COCO) never compete.
A model from before identities adopts the identity of its first version that has one;
versions without an identity stay loadable but never compete for ``best``.

**The alias.** ``best`` is the version of the model's identity with the highest ranking
metric; the earlier version wins a tie, so a worse or equal sweep never demotes a better
model. MLflow has no compare-and-set for aliases, so two sweeps finishing at once could each
read the old holder and set their own version (the later write wins, not the better
version). Instead each registrant, after creating its version, lists the versions, points
``best`` at the best of them and lists again, until the alias holds the best of what it
lists. Every write is followed by its writer's check, so the last thing that happens in any
interleaving is a check that sees every version: the alias ends on the best one (it may
point at a lesser one for the moment between a stale write and its check). Each version
records the outcome in words in its ``autoassign.best_comparison`` tag.

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
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.engine.checkpoint import CHECKPOINT_FILE
from autoassign.errors import CheckpointError
from orchestration.tracking.tags import TAG_DATASET, TAG_METRIC, TAG_SWEEP_ID

MODEL_PREFIX = "autoassign-"
BEST_ALIAS = "best"
ARTIFACT_FOLDER = "model"
TAG_VALUE = "autoassign.metric_value"
TAG_COMPARISON = "autoassign.best_comparison"
TAG_IDENTITY = "autoassign.identity"  # on versions: the identity as json
TAG_IDENTITY_KEY = "autoassign.identity_key"  # on versions and models: its hash
TAG_IDENTITY_SUMMARY = "autoassign.identity_summary"  # on models: the identity in words
TAG_REFUSED = "autoassign.registry_refused"  # on a trial's run whose model was refused
SETTLE_ROUNDS = 20
"""Rounds of list-and-set before giving up on the alias (a handful suffice: after the last
version is created, each registrant writes at most a stale value and then the best)."""
SHOWN_CLASSES = 5


class RegistryError(CheckpointError):
    """A model reference that names nothing in the registry, or a version without files."""


class RegistrationRefused(Exception):
    """A version whose identity differs from its registered model's: not registered."""


@dataclass(frozen=True)
class Registration:
    model: str
    version: str
    value: float
    became_best: bool
    comparison: str


@dataclass(frozen=True)
class DatasetIdentity:
    """What must be equal for two versions' metric values to be compared."""

    format: str
    classes: tuple[str, ...]
    split: str
    """The split the ranking metric was evaluated on."""
    metric: str

    @classmethod
    def of_checkpoint(cls, path: Path, metric: str) -> DatasetIdentity:
        """The identity of a checkpoint file's model, ranked by ``metric``."""
        from autoassign.config import ExperimentConfig
        from autoassign.config_loading import validate_model
        from autoassign.engine.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        config = validate_model(state["config"], ExperimentConfig, source=f"{path} (its config)")
        classes = state.get("class_names") or [str(i) for i in range(config.model.num_classes)]
        if config.data.format == "voc" and metric == "mAP":
            # VOC's "mAP" is the 11-point or the area AP, as eval.voc_metric says.
            metric = f"mAP ({config.eval.voc_metric})"
        return cls(config.data.format, tuple(classes), config.data.val_split, metric)

    @classmethod
    def from_json(cls, text: str) -> DatasetIdentity:
        data = json.loads(text)
        return cls(data["format"], tuple(data["classes"]), data["split"], data["metric"])

    def to_json(self) -> str:
        return json.dumps(
            {"format": self.format, "classes": list(self.classes), "split": self.split,
             "metric": self.metric},
            sort_keys=True,
        )  # fmt: skip

    @property
    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def describe(self) -> str:
        """E.g. ``80 coco classes (person, bicycle, ...), split val2017, ranked by bbox_mAP``."""
        shown = ", ".join(self.classes[:SHOWN_CLASSES])
        if len(self.classes) > SHOWN_CLASSES:
            shown += ", ..."
        return (
            f"{len(self.classes)} {self.format} classes ({shown}), split {self.split}, "
            f"ranked by {self.metric}"
        )


def model_name(dataset: str) -> str:
    return f"{MODEL_PREFIX}{dataset}"


def register_best(
    client: Any, rows: list[dict[str, Any]], *, storage: Any, sweep_id: str
) -> list[Registration]:
    """Register each leaderboard row's checkpoint as a version of its dataset's model.

    A row whose identity differs from its model's is not registered: the reason goes to
    stderr and to the row's run (tag ``autoassign.registry_refused``), and the other rows
    carry on.
    """
    from orchestration.tracking.mlflow_model import save_detector_model

    registered = []
    for row in rows:
        if row.get("status") != "ok" or not row.get("checkpoint") or not row.get("run_id"):
            continue
        name = model_name(row["dataset"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = storage.download_file(
                    f"{row['checkpoint'].rstrip('/')}/{CHECKPOINT_FILE}",
                    Path(tmp) / CHECKPOINT_FILE,
                )
                identity = DatasetIdentity.of_checkpoint(local, row["metric"])
                _claim(client, name, identity)  # before logging anything for a refused row
                model = save_detector_model(local, Path(tmp) / ARTIFACT_FOLDER)
                client.log_artifacts(row["run_id"], str(model), ARTIFACT_FOLDER)
            registered.append(
                register_version(
                    client,
                    name,
                    run_id=row["run_id"],
                    identity=identity,
                    value=float(row["value"]),
                    tags={TAG_SWEEP_ID: sweep_id, TAG_DATASET: row["dataset"]},
                )
            )
        except RegistrationRefused as refusal:
            print(f"registry: {refusal}", file=sys.stderr)
            client.set_tag(row["run_id"], TAG_REFUSED, str(refusal))
    return registered


def register_version(
    client: Any,
    name: str,
    *,
    run_id: str,
    identity: DatasetIdentity,
    value: float,
    tags: dict[str, str] | None = None,
) -> Registration:
    """A new version of ``name`` from the run's ``model/`` artifacts, ``best`` settled.

    Raises:
        RegistrationRefused: ``name`` holds another identity (nothing is registered).
    """
    _claim(client, name, identity)
    run = client.get_run(run_id)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{ARTIFACT_FOLDER}",
        run_id=run_id,
        tags={
            TAG_METRIC: identity.metric,
            TAG_VALUE: repr(value),
            TAG_IDENTITY: identity.to_json(),
            TAG_IDENTITY_KEY: identity.key,
            **(tags or {}),
        },
        description=f"{identity.metric} = {value:.4f}",
    )
    mine = str(version.version)
    owner = _owner(client, name)
    if owner is not None and owner[0] != identity.key:
        # Only a model from before identities gets here: another identity's version was
        # created just before ours, so it became the model's first identified version.
        client.delete_model_version(name, mine)
        raise RegistrationRefused(_refusal(name, owner[1], identity))
    comparison, became_best = _settle_best(client, name, identity, mine, value)
    client.set_model_version_tag(name, mine, TAG_COMPARISON, comparison)
    return Registration(name, mine, value, became_best, comparison)


def _claim(client: Any, name: str, identity: DatasetIdentity) -> None:
    """Create the registered model ``name`` with ``identity``, or check that it holds it.

    Raises:
        RegistrationRefused: the model holds another identity.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={TAG_IDENTITY_SUMMARY: identity.describe(), TAG_IDENTITY_KEY: identity.key},
            description=f"AutoAssign detectors of {identity.describe()}",
        )
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    owner = _owner(client, name)
    if owner is not None and owner[0] != identity.key:
        raise RegistrationRefused(_refusal(name, owner[1], identity))


def _owner(client: Any, name: str) -> tuple[str, str] | None:
    """The identity (key, words) that the model ``name`` holds; None for a model from before
    identities that has no version with one yet."""
    tags = client.get_registered_model(name).tags
    if TAG_IDENTITY_KEY in tags:
        return tags[TAG_IDENTITY_KEY], tags.get(TAG_IDENTITY_SUMMARY, tags[TAG_IDENTITY_KEY])
    identified = [v for v in _versions(client, name) if TAG_IDENTITY in v.tags]
    if not identified:
        return None
    first = min(identified, key=lambda v: int(v.version))
    identity = DatasetIdentity.from_json(first.tags[TAG_IDENTITY])
    # Version numbers only grow, so every registrant finds the same first version and these
    # writes agree. The key last: it is what makes the model's identity final.
    client.set_registered_model_tag(name, TAG_IDENTITY_SUMMARY, identity.describe())
    client.set_registered_model_tag(name, TAG_IDENTITY_KEY, identity.key)
    return identity.key, identity.describe()


def _refusal(name: str, owner_words: str, identity: DatasetIdentity) -> str:
    return (
        f"{name} holds models of {owner_words}; this one is of {identity.describe()}: "
        "not registered (versions of different data never compete for best); give the "
        "dataset another name in the sweep config"
    )


def _set_best(client: Any, name: str, version: str) -> bool:
    """Point ``best`` at ``version``; False when the store refused because another registrant
    wrote the alias at the same moment (MLflow's SQL stores read, then insert the alias row:
    two writers can both insert, and the second breaks the row's unique key; seen on SQLite
    with two sweeps registering at once)."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, BEST_ALIAS, version)
        return True
    except MlflowException as error:
        text = str(error).lower()
        if "unique constraint" in text or "duplicate key" in text:
            return False
        raise


def _settle_best(
    client: Any, name: str, identity: DatasetIdentity, mine: str, value: float
) -> tuple[str, bool]:
    """Point ``best`` at the best version of ``identity`` (see the module docstring): the
    words for ``autoassign.best_comparison`` and whether ``mine`` holds it."""
    metric, first_holder, settled = identity.metric, None, False
    for round_ in range(SETTLE_ROUNDS):
        versions = _versions(client, name)
        contenders = [
            v
            for v in versions
            if v.tags.get(TAG_IDENTITY_KEY) == identity.key and _value_of(v) is not None
        ]
        holder = _version_with_alias(client, name, BEST_ALIAS)
        if round_ == 0:
            first_holder = holder
        if not contenders:  # only ours, with a value that is not finite
            return f"{metric} {value}: not a finite value, does not compete for best", False
        winner = max(contenders, key=lambda v: (_value_of(v), -int(v.version)))
        if holder is not None and str(holder.version) == str(winner.version):
            settled = True
            break
        if holder is not None and str(holder.version) not in {str(v.version) for v in versions}:
            continue  # best went to a version created after our listing: list again
        if not _set_best(client, name, winner.version):
            continue  # another registrant set best at the same moment: list again
    winner_version, winner_value = str(winner.version), _value_of(winner)
    others = [v for v in contenders if str(v.version) != mine]
    if winner_version == mine:
        if not others:
            unidentified = ""
            if first_holder is not None and TAG_IDENTITY_KEY not in first_holder.tags:
                unidentified = (
                    f" (version {first_holder.version} held best without a recorded "
                    "identity, which does not compete)"
                )
            comparison = f"{metric} {value:.4f}: first version{unidentified}, now best"
        else:
            runner_up = max(others, key=lambda v: (_value_of(v), -int(v.version)))
            comparison = (
                f"{metric} {value:.4f} > {_value_of(runner_up):.4f} of version "
                f"{runner_up.version}: now best"
            )
    else:
        held = first_holder is not None and str(first_holder.version) == winner_version
        comparison = (
            f"{metric} {value:.4f} <= {winner_value:.4f} of version {winner_version}, "
            f"which {'stays' if held else 'is'} best"
        )
    if not settled:
        comparison += (
            f" (best not settled after {SETTLE_ROUNDS} rounds: other registrations kept moving it)"
        )
    return comparison, settled and winner_version == mine


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of ``name``, all pages."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


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
        versions = _versions(client, ref)
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
    return download_version(client, resolve_version(client, reference), reference, destination)


def download_version(client: Any, version: Any, reference: str, destination: Path) -> Path:
    """:func:`download` of a version already resolved (``reference`` names it in errors)."""
    import mlflow

    from orchestration.tracking.mlflow_model import checkpoint_in

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


def cache_root() -> Path:
    """Where :func:`resolve_model_uri` keeps downloaded versions: ``AUTOASSIGN_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/autoassign``, else ``~/.cache/autoassign``."""
    if os.environ.get("AUTOASSIGN_CACHE_DIR"):
        return Path(os.environ["AUTOASSIGN_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "autoassign"


def download_cached(reference: str, tracking_uri: str | None = None) -> Path:
    """The version's checkpoint file, downloaded once per registered version.

    A version's files never change once registered, so each version is kept under
    :func:`cache_root` and read from there the next time; an alias is resolved
    to its version on every call (it moves). Two processes downloading the same version at
    once each stage a folder and the first rename wins.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    version = resolve_version(client, reference)
    # The server, run and creation time as well as the number: a tracking store that is
    # deleted and started again hands out version 1 again, for other weights.
    origin = f"{client.tracking_uri}|{version.run_id}|{version.creation_timestamp}"
    digest = hashlib.sha256(origin.encode()).hexdigest()[:12]
    folder = cache_root() / "models" / version.name / f"{version.version}-{digest}"
    cached = sorted(folder.rglob(CHECKPOINT_FILE)) if folder.is_dir() else []
    if cached:
        return cached[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        inside = download_version(client, version, reference, staging).relative_to(staging)
        # A failed rename means another process finished the same version first: use theirs.
        with contextlib.suppress(OSError):
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (folder / inside).is_file():
        raise RegistryError(f"{reference}: could not keep the download in {folder}")
    return folder / inside


def resolve_model_uri(uri: str) -> Path:
    """The ``models`` resolver of :mod:`autoassign.checkpoint_sources`: the checkpoint of
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` from the registry at
    ``MLFLOW_TRACKING_URI``, kept in the download cache (:func:`download_cached`)."""
    return download_cached(uri)


def load_detector(reference: str, *, tracking_uri: str | None = None, device: str = "auto"):
    """A ready :class:`autoassign.predict.Predictor` for a registered model version.

    The checkpoint is downloaded to a temporary folder that is gone once the weights are in
    memory, so loading in a loop does not fill the disk.
    """
    from mlflow.tracking import MlflowClient

    from autoassign.predict import Predictor

    with tempfile.TemporaryDirectory(prefix="autoassign-model-") as folder:
        checkpoint = download(MlflowClient(tracking_uri), reference, Path(folder))
        return Predictor(checkpoint, device=device)


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
