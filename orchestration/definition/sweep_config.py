"""The sweep configuration: an experiment, the datasets it runs on, what to search, and where.

    sweep = load_sweep_config("configs/demo.yaml", ["search.num_samples=2"])

A sweep file is exactly :class:`SweepConfig` (pydantic, unknown keys are errors)::

    name: demo                       # names the output folder, the storage folder, the experiment
    base: {...}                      # an autoassign ExperimentConfig, shared by every trial
    datasets:                        # one Tune scheduler per dataset (they report other metrics)
      - {name: coco, format: coco, root: ${DATA}/coco, num_classes: 80,
         recipe: coco_r50_1x.yaml, overrides: {...}, ...}
      - {name: mine, format: voc, root: ~/data/mine, classes: [helmet, vest]}
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

Every mistake is found before Ray starts: the schema here, and
:func:`~orchestration.definition.config_loading.load_sweep_config` runs the checks that need
more (:mod:`~orchestration.definition.config_checks`,
:mod:`~orchestration.definition.evaluated_rungs`): a search key that names no field, a sampled
value the experiment schema would reject, a dataset folder that does not exist. Errors are
:class:`~autoassign.errors.ConfigError` naming the file and the field path (exit status 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from autoassign.config import DataConfig, ExperimentConfig

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


_ENV_PATTERN = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


_ENV_WITH_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def expand_env(text: str) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` from the environment (unset ones without a
    default stay as written, so the error can name them)."""
    text = _ENV_WITH_DEFAULT.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), text)
    return os.path.expandvars(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    classes: list[str] | None = None
    """Your own dataset's class names in label order (voc, coco, objects365): the trials'
    ``data.classes`` (see :class:`autoassign.config.DataConfig`); they also give the class
    count."""
    num_classes: int | None = Field(None, gt=0)
    """The class count; default the length of ``classes``, which it must equal when both are
    given."""
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
    def _class_count(self) -> DatasetConfig:
        if self.classes is None:
            if self.num_classes is None:
                raise ValueError("give num_classes, or classes (the class names)")
            return self
        try:  # the library's own checks of a class list
            DataConfig(format=self.format, classes=self.classes)
        except ValidationError as error:
            raise ValueError(error.errors()[0]["msg"].removeprefix("Value error, ")) from None
        if self.num_classes is None:
            self.num_classes = len(self.classes)
        elif self.num_classes != len(self.classes):
            raise ValueError(
                f"num_classes is {self.num_classes} but classes lists {len(self.classes)} "
                "names; give one of them, or make them agree"
            )
        return self

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


class ResourcesConfig(_Strict):
    workers_per_trial: int = Field(1, gt=0)
    """Ray Train workers (data-parallel processes) per trial."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """Fractions are allowed (several workers on one GPU)."""
    max_failures: int = Field(2, ge=0)
    """Times a trial's workers are restarted from their last checkpoint after a crash."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places a trial's workers (Ray Train's ``ScalingConfig.placement_strategy``):
    ``PACK`` on as few nodes as possible, ``SPREAD`` over as many as it can (losing a node
    then takes fewer of them); the ``STRICT_`` forms wait rather than place otherwise."""
    runner: Literal["ray_train", "trial"] = "ray_train"
    """Where a trial trains. ``ray_train``: a Ray Train ``TorchTrainer`` worker group started
    for the trial (any number of workers; Train restarts a crashed one). ``trial``: the
    trial's own Ray Tune process runs the one worker itself (``workers_per_trial: 1`` only):
    no Train controller, synchronization or report-queue actor per trial, and a process Tune
    reuses keeps its imports; after a crash Tune starts the trial again from its last
    checkpoint. For small trials on a small machine, where those actors' CPU comes out of the
    training (see the README's overhead section)."""

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @model_validator(mode="after")
    def _one_worker_in_a_trial_process(self) -> ResourcesConfig:
        if self.runner == "trial" and self.workers_per_trial != 1:
            raise ValueError(
                f"runner 'trial' trains in the trial's own process, one worker; "
                f"workers_per_trial is {self.workers_per_trial} (use runner: ray_train)"
            )
        return self


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
    flush_every_s: float = Field(10.0, ge=0)
    """How long a trial's metric points may wait before they are sent to MLflow together
    (0: each epoch's and each logged step's points at once). Fewer, bigger requests: a big
    sweep's trials then cost the tracking server a request per ``flush_every_s`` each, not
    one per epoch. Points still waiting are kept in each checkpoint, so a killed worker
    loses none; the run's end sends the rest."""


class StorageConfig(_Strict):
    path: str | None = None
    """Checkpoints and Ray's state: a local folder or ``s3://bucket/prefix``; default
    ``<output_dir>/ray``."""
    endpoint_url: str | None = None
    """An S3-compatible endpoint (MinIO); ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are
    honoured. Credentials and region come from the standard AWS environment and config."""
    num_to_keep: int = Field(2, gt=0)
    """Checkpoints kept per trial (the best by the ranking metric and the latest)."""
    shared: bool = False
    """A local ``path`` that every node of the cluster mounts (NFS): without it a sweep on a
    cluster of more than one node refuses a local path (exit 2), since each node would
    write its checkpoints where the others cannot read them."""

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
