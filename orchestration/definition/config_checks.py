"""The checks of a sweep file that need more than its schema: fields a dataset may not
override, search keys and variants that name real experiment fields with values the
experiment schema accepts, and dataset folders that exist. Each raises
:class:`~autoassign.errors.ConfigError` naming the file and the field path."""

from __future__ import annotations

from typing import Any

from autoassign.config import ExperimentConfig
from autoassign.config_loading import (
    check_field_path,
)
from autoassign.errors import ConfigError
from autoassign.weight_names import is_weights_name
from orchestration.definition.sweep_config import DatasetConfig, SweepConfig
from orchestration.definition.trial_experiments import VARIANT_KEY, trial_experiment

SWEEP_OWNED_FIELDS = frozenset(
    {
        "data",
        "data.format",
        "data.root",
        "data.train_split",
        "data.val_split",
        "data.classes",
        "data.synthesize_if_missing",
        "model",
        "model.num_classes",
        "output_dir",
        "device",
    }
)

"""ExperimentConfig fields the sweep sets itself from each dataset entry and its own folders:
they are neither searched nor overridden (other ``data.*`` fields, e.g. the batch size, are)."""


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
            owned="set by the sweep from the dataset entry (format, root, splits, classes, "
            "num_classes) "
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


def _fetch_named_weights(name: str, config: ExperimentConfig, *, where: str) -> None:
    """Named ImageNet weights (``msra:R-50``) are in this machine's cache, downloaded now when
    missing: the driver fills the cache before Ray starts, or the sweep stops, naming the URL
    and where to place the file (workers on other machines fetch on their own rank 0)."""
    from autoassign.model.pretrained import weights_file

    try:
        weights_file(name, depth=config.model.backbone.depth)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def check_dataset_folders(sweep: SweepConfig, *, source: str) -> None:
    """Every non-synthetic dataset's root exists (synthetic ones are written when missing),
    and the weights and checkpoint files its trials start from are there (named ImageNet
    weights: fetched into the cache now)."""
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
            origin = "the dataset's recipe or overrides" if key in dataset.overrides else "base"
            if is_weights_name(file):
                where = f"{source}: datasets.{index} ({dataset.name}): {key} {file}"
                _fetch_named_weights(file, config, where=f"{where} (set by {origin})")
            elif file is not None and not file.is_file():
                raise ConfigError(
                    f"{source}: datasets.{index} ({dataset.name}): {key} {file} does not "
                    f"exist (set by {origin}); put the file there, or override {key} "
                    "for this dataset"
                )
