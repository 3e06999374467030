"""The sweep configuration: an experiment, the datasets it runs on, what to search, and where.

    sweep = load_sweep_config("configs/demo.yaml", ["search.num_samples=2"])

A sweep file is exactly :class:`SweepConfig` (pydantic, unknown keys are errors)::

    name: demo                       # names the output folder, the storage folder, the experiment
    base: {...}                      # an autoassign ExperimentConfig, shared by every trial
    datasets:                        # one Tune scheduler per dataset (they report other metrics)
      - {name: coco, format: coco, root: ${DATA}/coco, num_classes: 80,
         recipe: coco_r50_1x.yaml, overrides: {...}, ...}
    search_space:                    # dot paths into ExperimentConfig -> one distribution each
      train.schedule: {grid: [1x, 13e]}
      model.center_prior.sigma_init: {uniform: [0.5, 2.0]}
    variants:                        # named bundles of overrides, crossed with the search
      full: {}                       # like one more grid key (the trials' ``variant`` param)
      fixed_prior: {model.center_prior.learnable: false}
    search: {algorithm: grid, num_samples: 1, scheduler: {type: asha}}
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    tracking: {uri: null, experiment: null}
    storage: {path: null, endpoint_url: null}
    ray: {address: null}

Every mistake is found here, before Ray starts: a search key that names no field, a sampled
value the experiment schema would reject, a dataset folder that does not exist. Errors are
:class:`~autoassign.errors.ConfigError` naming the file and the field path (exit status 2).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autoassign.config import ExperimentConfig
from autoassign.config_loading import (
    apply_overrides,
    check_field_path,
    format_validation_error,
    parse_override,
    read_yaml_mapping,
    validate_model,
)
from autoassign.errors import ConfigError

DEFAULT_RANKING_METRIC = {
    "coco": "bbox_mAP",
    "objects365": "bbox_mAP",
    "voc": "mAP",
    "widerface": "AP_hard",
}
"""The metric each protocol's trials are ranked (and early-stopped) on."""

KNOWN_METRICS = {
    "coco": ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"),
    "objects365": (
        "bbox_mAP",
        "bbox_mAP_50",
        "bbox_mAP_75",
        "bbox_mAP_s",
        "bbox_mAP_m",
        "bbox_mAP_l",
    ),
    "voc": ("mAP", "mAP_11pt", "mAP_area"),
    "widerface": ("AP_easy", "AP_medium", "AP_hard"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class SyntheticConfig(_Strict):
    """The embedded dataset written at ``root`` when it is missing (in the real format)."""

    images: int = Field(160, gt=0)
    """Training images; the val split gets a quarter (at least 4)."""
    image_size: int = Field(320, ge=64)
    num_classes: int | None = Field(None, gt=0)
    """Classes drawn (default 6; WiderFace 1; VOC keeps its 20 names)."""
    seed: int = 0


class DatasetConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    format: Literal["coco", "voc", "objects365", "widerface"]
    root: Path
    """The dataset folder; ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``~`` are expanded."""
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = Field(gt=0)
    metric: str | None = None
    """The metric that ranks this dataset's trials; default by format (see
    :data:`DEFAULT_RANKING_METRIC`)."""
    recipe: Path | None = None
    """An ExperimentConfig file (e.g. ``configs/coco_r50_1x.yaml``, relative to the sweep
    file) this dataset's trials follow: every value it writes applies over ``base`` for this
    dataset, except what the sweep sets itself (format, root, splits, class count, output
    folder, device); ``overrides`` apply over the recipe."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dot paths into ExperimentConfig, applied over ``base`` (and ``recipe``) for this
    dataset only."""
    synthetic: bool | SyntheticConfig = False
    """``true`` (or a mapping of options): write the embedded set at ``root`` if missing."""

    @model_validator(mode="before")
    @classmethod
    def _remember_root_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("root"), str):
            data = {**data, "root_variables": _ENV_PATTERN.findall(data["root"])}
        return data

    root_variables: list[str] = Field(default_factory=list, exclude=True, repr=False)
    """The environment variables ``root`` names (filled in from it, for error messages)."""

    @field_validator("root", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            return Path(os.path.expanduser(expand_env(str(value))))
        return value

    @model_validator(mode="after")
    def _metric_of_protocol(self) -> DatasetConfig:
        if self.metric is None:
            self.metric = DEFAULT_RANKING_METRIC[self.format]
        elif self.metric not in KNOWN_METRICS[self.format]:
            known = ", ".join(KNOWN_METRICS[self.format])
            raise ValueError(
                f"metric {self.metric!r} is not reported by the {self.format} protocol "
                f"(known: {known})"
            )
        return self

    @property
    def synthetic_options(self) -> SyntheticConfig | None:
        if self.synthetic is True:
            return SyntheticConfig()
        return self.synthetic or None

    @property
    def ranking_metric(self) -> str:
        assert self.metric is not None
        return self.metric


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


class Distribution(_Strict):
    """Exactly one of the keys: how one field's values are searched."""

    grid: list[Any] | None = None
    """Every value, in every combination with the other grid keys."""
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    """Integers ``low <= x < high``."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform, randint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: low must be below high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform: both bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def argument(self) -> Any:
        return getattr(self, self.kind)

    def representative_values(self) -> list[Any]:
        """Values that stand for every value it can produce (checked against the schema)."""
        value = self.argument
        if self.kind in ("grid", "choice"):
            return list(value)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return [value[0], (value[0] + value[1]) / 2, value[1]]


class SchedulerConfig(_Strict):
    """Early stopping, applied among the trials of one dataset only."""

    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, gt=0)
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(_Strict):
    algorithm: Literal["grid", "random", "tpe"] = "grid"
    """``grid``: every combination of ``grid`` keys, other keys sampled ``num_samples``
    times; ``random``: ``num_samples`` draws per dataset (``grid`` keys still expand);
    ``tpe``: Optuna's TPE draws the sampled keys from earlier trials' scores, one study per
    dataset and ``grid`` point, ``num_samples`` trials each."""
    num_samples: int = Field(1, gt=0)
    scheduler: SchedulerConfig = SchedulerConfig()
    max_concurrent_trials: int | None = Field(None, gt=0)
    """Default: as many as the cluster's CPUs / GPUs can run at once (at least 1)."""
    seed: int | None = 0
    """Seed of the random sampling, so a sweep's trials are reproducible (None: random)."""


# --------------------------------------------------------------------------------------------
# Resources, tracking, storage, Ray
# --------------------------------------------------------------------------------------------


class ResourcesConfig(_Strict):
    workers_per_trial: int = Field(1, gt=0)
    """Ray Train workers (data-parallel processes) per trial."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """Fractions are allowed (several workers on one GPU)."""
    max_failures: int = Field(2, ge=0)
    """Times a trial's workers are restarted from their last checkpoint after a crash."""

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class TrackingConfig(_Strict):
    uri: str | None = None
    """MLflow tracking URI (``http://host:5000``, ``sqlite:///...``); ``MLFLOW_TRACKING_URI``
    is honoured; default a SQLite file in the sweep's output folder."""
    experiment: str | None = None
    """Default: the sweep's name."""
    ui_url: str | None = None
    """Where users open the MLflow UI (default: the tracking URI when it is http)."""
    register_models: bool = True
    """Register each dataset's best trial as a version of ``autoassign-<dataset>`` in the
    MLflow model registry, moving its ``best`` alias only to a better version."""


class StorageConfig(_Strict):
    path: str | None = None
    """Checkpoints and Ray's state: a local folder or ``s3://bucket/prefix``; default
    ``<output_dir>/ray``."""
    endpoint_url: str | None = None
    """An S3-compatible endpoint (MinIO); ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are
    honoured. Credentials and region come from the standard AWS environment and config."""
    num_to_keep: int = Field(2, gt=0)
    """Checkpoints kept per trial (the best by the ranking metric and the latest)."""

    @property
    def is_s3(self) -> bool:
        return self.path is not None and self.path.startswith("s3://")


class RayConfig(_Strict):
    address: str | None = None
    """A running cluster (``ray://host:10001``, ``auto``); ``RAY_ADDRESS`` is honoured;
    default a local Ray started for the sweep."""


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: ExperimentConfig = ExperimentConfig()
    datasets: list[DatasetConfig] = Field(min_length=1)
    search_space: dict[str, Distribution] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named bundles of experiment overrides (dot path -> value), e.g. an ablation's
    switches. Each dataset runs every variant at every point of the search, as if
    ``variant`` were one more ``grid`` key; trials log its name as the ``variant`` param."""
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    output_dir: Path | None = None
    """Local folder for the manifest, leaderboard and default stores; default
    ``runs/<name>``."""

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetConfig]) -> list[DatasetConfig]:
        names = [d.name for d in datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(duplicates)}")
        return datasets

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in variants if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)]
        if bad:
            raise ValueError(
                f"variant names are letters, digits, '_', '.' and '-'; not {', '.join(bad)}"
            )
        return variants

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    def dataset(self, name: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.name == name)


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------

_ENV_PATTERN = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_ENV_WITH_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def expand_env(text: str) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` from the environment (unset ones without a
    default stay as written, so the error can name them)."""
    text = _ENV_WITH_DEFAULT.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), text)
    return os.path.expandvars(text)


def load_sweep_config(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read and fully check a sweep file (see the module docstring).

    Raises:
        ConfigError: anything wrong, with the file and field path in the message.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    if not data:
        raise ConfigError(f"{path}: the file is empty; a sweep needs at least name and datasets")
    overrides = list(overrides)
    for override in overrides:
        key, _ = parse_override(override)
        try:
            check_field_path(SweepConfig, key)
        except ConfigError as error:
            raise ConfigError(f"{path}: override {override!r}: {error}") from None
    data = apply_overrides(data, overrides)
    sweep = validate_model(data, SweepConfig, source=str(path), overrides=overrides)
    for index, dataset in enumerate(sweep.datasets):
        apply_recipe(dataset, sweep_file=path, source=f"{path}: datasets.{index}.recipe")
        check_dataset_overrides(dataset, source=f"{path}: datasets.{index}.overrides")
        trial_experiment(sweep, dataset, {}, source=f"{path}: datasets.{index}.overrides")
    check_search_space(sweep, source=str(path))
    check_variants(sweep, source=str(path))
    check_scheduler_rungs(sweep, source=str(path))
    return sweep


SWEEP_OWNED_FIELDS = frozenset(
    {
        "data",
        "data.format",
        "data.root",
        "data.train_split",
        "data.val_split",
        "data.synthesize_if_missing",
        "model",
        "model.num_classes",
        "output_dir",
        "device",
    }
)
"""ExperimentConfig fields the sweep sets itself from each dataset entry and its own folders:
they are neither searched nor overridden (other ``data.*`` fields, e.g. the batch size, are)."""


def apply_recipe(dataset: DatasetConfig, *, sweep_file: Path, source: str) -> None:
    """Fold the dataset's recipe file into its overrides (the explicit overrides win).

    The recipe must be a valid ExperimentConfig for the dataset's format; its values that
    the sweep sets itself are left out. ``dataset.recipe`` becomes the resolved path.
    """
    if dataset.recipe is None:
        return
    recipe = dataset.recipe if dataset.recipe.is_absolute() else sweep_file.parent / dataset.recipe
    if not recipe.is_file():
        raise ConfigError(f"{source}: {recipe} does not exist")
    written = read_yaml_mapping(recipe)
    config = validate_model(written, ExperimentConfig, source=str(recipe))
    if "format" in written.get("data", {}) and config.data.format != dataset.format:
        raise ConfigError(
            f"{source}: {recipe} is a {config.data.format} recipe, but dataset "
            f"{dataset.name!r} is {dataset.format}"
        )
    settings = {key: value for key, value in _leaves(written) if key not in SWEEP_OWNED_FIELDS}
    dataset.recipe = recipe
    dataset.overrides = {**settings, **dataset.overrides}


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``("a.b.c", value)`` for every non-mapping value written in ``data``."""
    leaves = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves += _leaves(value, f"{path}.")
        else:
            leaves.append((path, value))
    return leaves


def check_experiment_key(key: str, *, where: str, owned: str) -> None:
    """``key`` names an ExperimentConfig field that the sweep does not set itself; the
    ConfigError starts with ``where`` and says ``owned`` for a field the sweep sets."""
    try:
        check_field_path(ExperimentConfig, key)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if key in SWEEP_OWNED_FIELDS:
        raise ConfigError(f"{where}: {owned}")


def check_dataset_overrides(dataset: DatasetConfig, *, source: str) -> None:
    """Each override names an ExperimentConfig field the sweep does not set itself."""
    for key in dataset.overrides:
        check_experiment_key(
            key,
            where=f"{source}.{key}",
            owned="set by the sweep from the dataset entry (format, root, splits, num_classes) "
            "and its own folders, not by an override",
        )


def check_search_space(sweep: SweepConfig, *, source: str) -> None:
    """Each key names an ExperimentConfig field, and each value it can take validates there."""
    sampled = [key for key, d in sweep.search_space.items() if d.kind != "grid"]
    if sweep.search.algorithm == "tpe" and not sampled:
        raise ConfigError(
            f"{source}: search.algorithm: tpe needs at least one sampled key in search_space "
            "(choice, uniform, loguniform or randint); with grid keys only, use grid"
        )
    for key, distribution in sweep.search_space.items():
        where = f"{source}: search_space.{key}"
        check_experiment_key(
            key,
            where=where,
            owned="the dataset, class count, output folder and device are set by the sweep, "
            "not searched (list datasets under datasets:)",
        )
        for dataset in sweep.datasets:
            for value in distribution.representative_values():
                trial_experiment(sweep, dataset, {key: value}, source=where, value_note=value)


def check_variants(sweep: SweepConfig, *, source: str) -> None:
    """Each variant's keys name ExperimentConfig fields that neither the sweep sets nor the
    search space searches, and every variant validates on every dataset."""
    if VARIANT_KEY in sweep.search_space:
        raise ConfigError(f"{source}: search_space.{VARIANT_KEY}: list variants under variants:")
    for name, settings in sweep.variants.items():
        where = f"{source}: variants.{name}"
        for key in settings:
            check_experiment_key(
                key, where=f"{where}.{key}", owned="set by the sweep, not by a variant"
            )
            if key in sweep.search_space:
                raise ConfigError(
                    f"{where}.{key}: also in search_space; a trial's value would be ambiguous"
                )
        for dataset in sweep.datasets:
            trial_experiment(sweep, dataset, {VARIANT_KEY: name}, source=where)


VARIANT_KEY = "variant"
"""The trial parameter naming the trial's variant (see :attr:`SweepConfig.variants`)."""


def trial_experiment(
    sweep: SweepConfig,
    dataset: DatasetConfig,
    params: dict[str, Any],
    *,
    source: str = "sweep",
    value_note: Any = None,
    output_dir: Path | None = None,
) -> ExperimentConfig:
    """The ExperimentConfig of one trial: ``base``, then the dataset, then its variant's
    overrides, then the sampled ``params``.

    Args:
        params: dot path -> value, as the search space sampled them, and
            :data:`VARIANT_KEY` -> a name among ``sweep.variants`` when the sweep has them.
    """
    params = dict(params)
    variant = params.pop(VARIANT_KEY, None)
    if variant is not None and variant not in sweep.variants:
        raise ConfigError(
            f"{source}: no variant {variant!r}; the sweep has: "
            + (", ".join(sweep.variants) or "(none)")
        )
    variant_settings = list(sweep.variants.get(variant, {}).items())
    data = sweep.base.model_dump(mode="json", exclude_unset=False)
    data["data"].update(
        {
            "format": dataset.format,
            "root": str(dataset.root),
            "train_split": dataset.train_split,
            "val_split": dataset.val_split,
            "synthesize_if_missing": False,
        }
    )
    data["model"]["num_classes"] = dataset.num_classes
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    data = _set_paths(data, [*dataset.overrides.items(), *variant_settings, *params.items()])
    try:
        return ExperimentConfig.model_validate(data)
    except Exception as error:  # pydantic.ValidationError
        from pydantic import ValidationError

        if not isinstance(error, ValidationError):
            raise
        detail = format_validation_error(error, source)
        if value_note is not None:
            detail += f" (for the value {value_note!r}, on dataset {dataset.name!r})"
        raise ConfigError(detail) from None


def _set_paths(data: dict[str, Any], assignments: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each ``a.b.c`` to its value (values are already parsed, unlike CLI overrides)."""
    for key, value in assignments:
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return data


def check_dataset_folders(sweep: SweepConfig, *, source: str) -> None:
    """Every non-synthetic dataset's root exists (synthetic ones are written when missing)."""
    for index, dataset in enumerate(sweep.datasets):
        if dataset.synthetic_options is not None or dataset.root.is_dir():
            continue
        named = dataset.root_variables
        hint = (
            f"set {' and '.join(named)} to the folder holding it"
            if named
            else "edit root in the file"
        )
        raise ConfigError(
            f"{source}: datasets.{index}.root: the {dataset.name!r} dataset folder "
            f"{dataset.root} does not exist; {hint}, or set synthetic: true to use the "
            "embedded synthetic set"
        )
    for index, dataset in enumerate(sweep.datasets):
        config = trial_experiment(sweep, dataset, {}, source=source)
        for key, file in (
            ("model.backbone.weights", config.model.backbone.weights),
            ("model.checkpoint", config.model.checkpoint),
        ):
            if file is not None and not file.is_file():
                origin = "the dataset's recipe or overrides" if key in dataset.overrides else "base"
                raise ConfigError(
                    f"{source}: datasets.{index} ({dataset.name}): {key} {file} does not "
                    f"exist (set by {origin}); put the file there, or override {key} "
                    "for this dataset"
                )


# --------------------------------------------------------------------------------------------
# Early stopping on evaluated epochs
# --------------------------------------------------------------------------------------------

SCHEDULE_FIELDS = ("train.schedule", "train.epochs", "eval.every_epochs")
"""The fields that decide which epochs of a trial are evaluated."""


def is_evaluated(epoch: int, epochs: int, every_epochs: int) -> bool:
    """Whether a trial of ``epochs`` epochs evaluates after epoch ``epoch`` (1-based): after
    every ``every_epochs``-th and always after the last (``every_epochs`` 0: only after the
    last), as ``autoassign.engine.Trainer`` does."""
    return epoch == epochs or (every_epochs > 0 and epoch % every_epochs == 0)


def asha_max_t(scheduler: SchedulerConfig, max_epochs: int) -> int:
    """ASHA's ``max_t``, in epochs: the sweep's schedule length, at least the grace period."""
    return max(max_epochs, scheduler.grace_period)


def asha_rungs(scheduler: SchedulerConfig, max_epochs: int) -> list[int]:
    """The epochs after which ASHA compares trials, in order.

    Ray's bracket has milestones ``grace_period * reduction_factor**k`` up to ``max_t``, each
    decided by the first epoch at or after it; a result at ``max_t`` or later is stopped
    without a comparison, so only the epochs below ``max_t`` count.
    """
    max_t = asha_max_t(scheduler, max_epochs)
    grace, factor = scheduler.grace_period, scheduler.reduction_factor
    count = int(math.log(max_t / grace) / math.log(factor) + 1)  # as Ray's _Bracket counts
    epochs = {math.ceil(grace * factor**k) for k in range(count)}
    return sorted(epoch for epoch in epochs if epoch < max_t)


def trial_schedules(sweep: SweepConfig, *, source: str) -> list[tuple[str, int, int]]:
    """``(trial, epochs, eval.every_epochs)`` for every way a trial can resolve them.

    Each dataset (with its recipe and overrides) in each variant, at every value of the
    searched :data:`SCHEDULE_FIELDS` (all the integers of a ``randint``); ``trial`` names the
    dataset and those values.
    """
    keys = [key for key in sweep.search_space if _sets_schedule(key)]
    values = [_every_value(sweep.search_space[key]) for key in keys]
    found = []
    for dataset in sweep.datasets:
        for variant in list(sweep.variants) or [None]:
            for point in itertools.product(*values):
                params = dict(zip(keys, point))
                if variant is not None:
                    params[VARIANT_KEY] = variant
                config = trial_experiment(sweep, dataset, params, source=source)
                epochs, _ = config.train.resolved_schedule()
                named = [f"dataset {dataset.name!r}", *(f"{k}={v}" for k, v in params.items())]
                found.append((", ".join(named), epochs, config.eval.every_epochs))
    return found


def _sets_schedule(key: str) -> bool:
    return any(field == key or field.startswith(f"{key}.") for field in SCHEDULE_FIELDS)


def _every_value(distribution: Distribution) -> list[Any]:
    if distribution.kind == "randint":
        return list(range(*distribution.argument))
    return distribution.representative_values()


def check_scheduler_rungs(sweep: SweepConfig, *, source: str) -> None:
    """ASHA compares trials on evaluated epochs only, or the sweep is refused.

    Rule: with ``search.scheduler.type: asha``, every rung epoch (:func:`asha_rungs`, with
    the base schedule's epochs, which the sweep gives its scheduler) that a trial reaches is
    an epoch it evaluates (:func:`is_evaluated`), for each trial's own epochs and
    ``eval.every_epochs`` (:func:`trial_schedules`). An epoch without an evaluation reports
    no ``score``, so ASHA would compare at a later evaluation instead: grace_period 1 with
    every_epochs 8 would silently mean 8. Refusing, rather than moving the rungs onto
    evaluated epochs, keeps the numbers in the file the ones that run, and leaves Ray's
    bracket bookkeeping as Ray wrote it.
    """
    scheduler = sweep.search.scheduler
    if scheduler.type != "asha":
        return
    max_epochs, _ = sweep.base.train.resolved_schedule()
    schedules = trial_schedules(sweep, source=source)
    unevaluated = _first_unevaluated(scheduler, max_epochs, schedules)
    if unevaluated is None:
        return
    trial, epochs, every, missed = unevaluated
    rungs = ", ".join(map(str, asha_rungs(scheduler, max_epochs)))
    when = (
        f"after every {every} epochs (eval.every_epochs {every}) and after its last, {epochs}"
        if every > 0
        else f"only after its last epoch, {epochs} (eval.every_epochs 0)"
    )
    suggestion = _suggested_grace(scheduler, max_epochs, schedules)
    hint = (
        f"set search.scheduler.grace_period: {suggestion}, or evaluate those epochs too"
        if suggestion is not None
        else "no grace_period puts every rung on an evaluated epoch with reduction_factor "
        f"{scheduler.reduction_factor:g}: evaluate more often, change "
        "search.scheduler.reduction_factor, or use search.scheduler.type: fifo"
    )
    raise ConfigError(
        f"{source}: search.scheduler.grace_period {scheduler.grace_period} "
        f"(reduction_factor {scheduler.reduction_factor:g}) has ASHA compare trials after "
        f"epochs {rungs} (below max_t {asha_max_t(scheduler, max_epochs)}), but {trial} "
        f"evaluates {when}: epoch(s) {', '.join(map(str, missed))} would be compared "
        f"without an evaluation; {hint}"
    )


def _first_unevaluated(
    scheduler: SchedulerConfig, max_epochs: int, schedules: list[tuple[str, int, int]]
) -> tuple[str, int, int, list[int]] | None:
    """The first trial schedule with a rung it reaches but does not evaluate, and those rungs."""
    rungs = asha_rungs(scheduler, max_epochs)
    for trial, epochs, every in schedules:
        missed = [r for r in rungs if r <= epochs and not is_evaluated(r, epochs, every)]
        if missed:
            return trial, epochs, every, missed
    return None


def _suggested_grace(
    scheduler: SchedulerConfig, max_epochs: int, schedules: list[tuple[str, int, int]]
) -> int | None:
    """The smallest grace period above the given one with rungs, all of them evaluated."""
    for grace in range(scheduler.grace_period + 1, max_epochs):
        candidate = scheduler.model_copy(update={"grace_period": grace})
        rungs = asha_rungs(candidate, max_epochs)
        if rungs and _first_unevaluated(candidate, max_epochs, schedules) is None:
            return grace
    return None
