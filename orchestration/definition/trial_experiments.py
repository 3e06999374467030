"""One trial's :class:`~autoassign.config.ExperimentConfig`: ``base``, then its dataset, then
its variant's overrides, then the sampled values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoassign.config import ExperimentConfig
from autoassign.config_loading import (
    format_validation_error,
)
from autoassign.errors import ConfigError
from orchestration.definition.sweep_config import DatasetConfig, SweepConfig

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
            "classes": dataset.classes,
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
