"""Early stopping on evaluated epochs only: which epochs each trial evaluates, where ASHA's
rungs fall, and the check that refuses a sweep whose rungs would compare trials on epochs
without an evaluation (naming ``search.scheduler.grace_period`` and ``eval.every_epochs``)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from autoassign.errors import ConfigError
from orchestration.definition.sweep_config import Distribution, SchedulerConfig, SweepConfig
from orchestration.definition.trial_experiments import VARIANT_KEY, trial_experiment

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
