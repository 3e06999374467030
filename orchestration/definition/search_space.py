"""The sweep's search space as Ray Tune sees it, and the trial plan it gives.

The Tune config of a trial is flat: ``{"dataset": "coco", "train.schedule": "13e",
"model.center_prior.sigma_init": 1.37}``. The dataset is always a grid dimension, so every
dataset gets the same search; ``grid`` keys expand into every combination, and the sampled
keys (``choice``, ``uniform``, ``loguniform``, ``randint``) are drawn ``num_samples`` times per
grid point. A sweep's ``variants`` are one more grid dimension, ``"variant": "fixed_prior"``.

``tpe`` (Optuna's Tree-structured Parzen Estimator) draws the sampled keys from what earlier
trials scored, one study per dataset and grid point: see :mod:`orchestration.definition.tpe_search`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from orchestration.definition.sweep_config import Distribution, SweepConfig
from orchestration.definition.trial_experiments import VARIANT_KEY
from orchestration.definition.trial_names import DATASET_KEY


def tune_domain(distribution: Distribution) -> Any:
    """The ``ray.tune`` search domain of one distribution."""
    from ray import tune

    kind, value = distribution.kind, distribution.argument
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    return tune.randint(*value)


def grid_dimensions(sweep: SweepConfig) -> dict[str, list[Any]]:
    """The grid keys and their values: the variants (when there are any), then the search
    space's ``grid`` keys."""
    dimensions: dict[str, list[Any]] = {}
    if sweep.variants:
        dimensions[VARIANT_KEY] = list(sweep.variants)
    for key, distribution in sweep.search_space.items():
        if distribution.kind == "grid":
            dimensions[key] = list(distribution.argument)
    return dimensions


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {DATASET_KEY: tune.grid_search([d.name for d in sweep.datasets])}
    if sweep.variants:
        space[VARIANT_KEY] = tune.grid_search(list(sweep.variants))
    for key, distribution in sweep.search_space.items():
        space[key] = tune_domain(distribution)
    return space


def trials_per_dataset(sweep: SweepConfig) -> int:
    """Grid points times ``num_samples``: how many trials each dataset gets."""
    grid_size = math.prod(len(values) for values in grid_dimensions(sweep).values())
    return grid_size * sweep.search.num_samples


def describe_space(sweep: SweepConfig) -> dict[str, str]:
    """Each searched key and its distribution, as text (for the plan and the parent run)."""
    described = {VARIANT_KEY: f"grid {list(sweep.variants)}"} if sweep.variants else {}
    for key, distribution in sweep.search_space.items():
        described[key] = f"{distribution.kind} {distribution.argument}"
    return described


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the grid dimensions, each as a flat Tune config fragment."""
    dimensions = grid_dimensions(sweep)
    keys, values = list(dimensions), list(dimensions.values())
    return [dict(zip(keys, combination)) for combination in itertools.product(*values)]


def sampled_space(sweep: SweepConfig) -> dict[str, Any]:
    """The sampled (non-grid) keys as Tune domains, for a model-based searcher."""
    return {
        key: tune_domain(distribution)
        for key, distribution in sweep.search_space.items()
        if distribution.kind != "grid"
    }
