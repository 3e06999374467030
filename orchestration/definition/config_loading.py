"""Reading a sweep file: ``${VAR:-default}`` expanded, ``key=value`` overrides applied,
each dataset's recipe merged under it, and every check of :mod:`config_checks` and
:mod:`evaluated_rungs` run, so that nothing starts on a config that cannot work.

    sweep = load_sweep_config("configs/demo.yaml", ["search.num_samples=2"])
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from autoassign.config import ExperimentConfig
from autoassign.config_loading import (
    apply_overrides,
    check_field_path,
    parse_override,
    read_yaml_mapping,
    validate_model,
)
from autoassign.errors import ConfigError
from orchestration.definition.config_checks import (
    SWEEP_OWNED_FIELDS,
    _leaves,
    check_dataset_overrides,
    check_search_space,
    check_variants,
)
from orchestration.definition.evaluated_rungs import check_scheduler_rungs
from orchestration.definition.sweep_config import DatasetConfig, SweepConfig
from orchestration.definition.trial_experiments import trial_experiment


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
