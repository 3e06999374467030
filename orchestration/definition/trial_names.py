"""What names a trial: the dataset key of its Tune config, its searched parameters, its
readable label, and the result key that says its loss went non-finite."""

from __future__ import annotations

from typing import Any

DATASET_KEY = "dataset"

"""The Tune config key naming the trial's dataset; the other keys are search-space paths."""


NONFINITE_KEY = "nonfinite_error"

"""Reported by the workers instead of raising when the loss went NaN/inf (see worker.py):
retrying would only repeat it."""


def trial_params(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The search-space values of a trial (every key but the dataset)."""
    return {key: value for key, value in tune_config.items() if key != DATASET_KEY}


def trial_label(dataset: str, params: dict[str, Any]) -> str:
    """A short readable name: ``coco·13e·sigma=1.5``."""
    parts = [dataset]
    for key, value in params.items():
        field = key.rsplit(".", 1)[-1]
        shown = _short(value)
        if field in ("schedule", "variant"):
            parts.append(shown)
        else:
            parts.append(f"{field.removesuffix('_init')}={shown}")
    return "·".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_short(v) for v in value)
    return str(value)
