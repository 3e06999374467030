"""Optuna TPE for a sweep over several datasets: one study per dataset and grid point.

Kept apart from :mod:`orchestration.definition.search_space` because it imports Ray and Optuna,
which the
config check and the dry run never need.
"""

from __future__ import annotations

import pickle
from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestration.definition.search_space import grid_points, sampled_space
from orchestration.definition.sweep_config import SweepConfig
from orchestration.definition.trial_names import DATASET_KEY


class PerGroupSearcher(Searcher):
    """Optuna TPE with one study per dataset and grid point.

    TPE learns from the scores of earlier trials, and a COCO box AP says nothing about a
    WiderFace AP_hard, so each group (a dataset, and one combination of the ``grid`` keys)
    gets a study of its own that only ever sees its own trials. Groups are served in turn,
    ``samples_per_group`` trials each, then the searcher reports it is finished.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        space: dict[str, Any],
        samples_per_group: int,
        seed: int | None,
        metric: str = "score",
        mode: str = "max",
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.groups = groups
        self.samples_per_group = samples_per_group
        optuna_space = OptunaSearch.convert_search_space(space)
        self.studies = [
            OptunaSearch(
                space=optuna_space,
                metric=metric,
                mode=mode,
                seed=None if seed is None else seed + index,
            )
            for index in range(len(groups))
        ]
        self.started = [0] * len(groups)
        self.group_of: dict[str, int] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        waiting = [i for i, n in enumerate(self.started) if n < self.samples_per_group]
        if not waiting:
            return self.FINISHED
        group = min(waiting, key=lambda i: self.started[i])
        params = self.studies[group].suggest(trial_id)
        self.started[group] += 1
        self.group_of[trial_id] = group
        return {**self.groups[group], **params}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.group_of and self.metric in result:
            self.studies[self.group_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self.group_of:
            if result is not None and self.metric not in result:
                result = None  # failed before its first evaluation: nothing for TPE to learn
            self.studies[self.group_of[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def tpe_searcher(sweep: SweepConfig, max_concurrent: int) -> Any:
    """The sweep's TPE search: a :class:`PerGroupSearcher` behind a concurrency limit."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study otherwise
    groups = [
        {DATASET_KEY: dataset.name, **point}
        for dataset in sweep.datasets
        for point in grid_points(sweep)
    ]
    searcher = PerGroupSearcher(
        groups, sampled_space(sweep), sweep.search.num_samples, sweep.search.seed
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
