"""One Tune scheduler per dataset, inside one Tuner.

The datasets of a sweep report different protocols (COCO AP, VOC mAP, WiderFace hard AP),
whose values are not comparable: an early-stopping rule such as ASHA must only compare
trials of the same dataset. :class:`PerDatasetScheduler` keeps an independent scheduler for
each value of ``trial.config["dataset"]`` and hands every event to that dataset's one, so the
whole sweep still runs as a single Tuner (one trial table, one resume, shared resources).

Early stopping decides on evaluations only. An epoch without an evaluation reports no
``score`` (see :class:`orchestration.running.worker.RayReporter`); Ray's ASHA skips such a result
(``AsyncHyperBandScheduler.on_trial_result`` returns CONTINUE when the metric is missing),
and the sweep file is refused unless every rung falls on an evaluated epoch
(:func:`orchestration.definition.evaluated_rungs.check_scheduler_rungs`).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestration.definition.evaluated_rungs import asha_max_t
from orchestration.definition.sweep_config import SchedulerConfig

TUNE_ENV = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
"""The environment of the process running Tune's controller (the sweep driver; under Ray
Client, the remote tuner: ``ray.init(runtime_env={"env_vars": ...})``). Tune's strict metric
check otherwise ends the whole sweep at the first result without ``score``
(``TuneController._validate_result_metrics``), which every epoch without an evaluation is."""


def build_scheduler(config: SchedulerConfig, *, max_epochs: int) -> TrialScheduler:
    """FIFO (no early stopping) or ASHA per dataset on the reported ``score``.

    ``score`` is each trial's own dataset's ranking metric; ``epoch`` is the time axis, and
    ``max_epochs`` (epochs) bounds it as ASHA's ``max_t``.
    """
    if config.type == "fifo":
        return FIFOScheduler()
    return PerDatasetScheduler(
        {
            "time_attr": "epoch",
            "max_t": asha_max_t(config, max_epochs),
            "grace_period": config.grace_period,
            "reduction_factor": config.reduction_factor,
        }
    )


class PerDatasetScheduler(FIFOScheduler):
    """ASHA among the trials of each dataset separately (see the module docstring).

    A result without a finite ``score`` is never handed to ASHA: a missing one it skips by
    itself, but a NaN (a trial's failure report on an epoch without an evaluation) it would
    record at a rung as a pass, since its cutoffs ignore NaN.

    Args:
        asha_options: keyword arguments of every per-dataset ``ASHAScheduler``.
    """

    def __init__(self, asha_options: dict[str, Any]):
        super().__init__()
        self.asha_options = dict(asha_options)
        self.by_dataset: dict[str, ASHAScheduler] = {}
        self._metric: str | None = None
        self._mode: str | None = None

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        for scheduler in self.by_dataset.values():
            scheduler.set_search_properties(self._metric, self._mode, **spec)
        return True

    def scheduler_of(self, trial: Any) -> ASHAScheduler:
        dataset = trial.config["dataset"]
        if dataset not in self.by_dataset:
            scheduler = ASHAScheduler(metric=self._metric, mode=self._mode, **self.asha_options)
            self.by_dataset[dataset] = scheduler
        return self.by_dataset[dataset]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.scheduler_of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.scheduler_of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self.scored(result):
            return self.CONTINUE
        return self.scheduler_of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        scheduler = self.scheduler_of(trial)
        if trial.trial_id not in scheduler._trial_info:
            return
        if self.scored(result):
            scheduler.on_trial_complete(tune_controller, trial, result)
        else:  # nothing to record at a rung: only forget the trial
            scheduler.on_trial_remove(tune_controller, trial)

    def scored(self, result: dict | None) -> bool:
        """Whether ``result`` carries a finite value of the metric (an evaluated epoch)."""
        value = (result or {}).get(self._metric)
        return isinstance(value, Real) and math.isfinite(value)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        scheduler = self.scheduler_of(trial)
        if trial.trial_id in scheduler._trial_info:
            scheduler.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        lines = ["ASHA per dataset:"]
        for name, scheduler in sorted(self.by_dataset.items()):
            lines.append(f"  {name}: stopped {scheduler._num_stopped}")
        return "\n".join(lines)

    def stopped_count(self, dataset: str) -> int:
        scheduler = self.by_dataset.get(dataset)
        return scheduler._num_stopped if scheduler is not None else 0
