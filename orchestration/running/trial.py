"""One Tune trial: a small driver that runs a Ray Train ``TorchTrainer`` and forwards its reports.

Ray Train V2's ``RunConfig`` takes no Tune callbacks, so Ray's documented Train-in-Tune
pattern is used: the Tune trainable (:func:`run_trial`) builds the trial's
``ExperimentConfig``, opens (or finds) the trial's MLflow child run, and calls
``TorchTrainer.fit()`` with ``TuneReportCallback``, which forwards every worker report to
Tune (and so to the scheduler). The Train run is named after the trial, so a trial started
again (a retried error, a resumed sweep) continues from the last checkpoint in storage.

Restarts. Ray Train replaces the trial's workers (``resources.max_failures`` times); the
driver itself runs beside Train's controller, so losing the driver's node (or its process)
takes both, and Ray Tune then starts the trial again (:func:`trial_failure_config`, the same
number of times): the new driver's ``TorchTrainer`` restores the last checkpoint Train
registered, into the same MLflow run. Tune decides that by a count alone
(``Trial.should_recover``: failures so far against ``max_failures``, whatever the error), so
the driver refuses a restart that could only repeat a failure it already recorded
(:func:`final_failure`), and :class:`~orchestration.tracking.run_closing.RunCloser` takes away the
retries of a trial that reported a non-finite loss, which then ends at once.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.common.error_text import first_line, ray_error_reason
from orchestration.definition.sweep_config import SweepConfig
from orchestration.definition.trial_experiments import trial_experiment
from orchestration.definition.trial_names import (
    DATASET_KEY,
    NONFINITE_KEY,
    trial_label,
    trial_params,
)
from orchestration.running import trial_run_ids
from orchestration.tracking.retries import OUTAGE_WAIT_S

logger = logging.getLogger(__name__)


class TrialFailure(RuntimeError):
    """A trial that cannot succeed (its loss went non-finite, or a restart would repeat a
    failure already recorded); the message says why."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial driver needs to know about its sweep (sent to it by Tune)."""

    sweep: dict[str, Any]
    """The SweepConfig as plain data."""
    sweep_id: str
    parent_run_id: str | None
    tracking_uri: str | None
    storage_root: str
    storage_endpoint: str | None
    work_dir: str
    """Absolute local folder for rank 0's files of each trial (``<work_dir>/<trial_id>``)."""
    tracking_wait_s: float = OUTAGE_WAIT_S
    """How long a trial waits out an unreachable tracking server: at its start and for the
    final flush of its metrics."""
    placement_group_cleaner: bool = True
    """Whether each trial's Ray Train run starts its placement-group cleaner: False on a Ray
    without its dashboard, whose State API that cleaner needs
    (:mod:`orchestration.running.lean_trainer`)."""
    experiment_id: str | None = None
    """The sweep's MLflow experiment, which its driver found or created: a trial does not
    look it up again (one request less per trial)."""
    new_sweep: bool = False
    """True when this launch made the sweep id (not a ``--resume``): no trial run of the sweep
    exists before its trial first starts, so that start opens one without searching MLflow."""
    launch_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """New for each run of the sweep driver (a ``--resume`` gets another): a failure that a
    trial driver recorded under this launch is not retried by Tune within it."""

    def sweep_config(self) -> SweepConfig:
        return SweepConfig.model_validate(self.sweep)


def trial_failure_config(sweep: SweepConfig) -> Any:
    """Ray Tune's ``FailureConfig`` for the sweep's trials (the trial drivers).

    A trial whose driver died (its node lost, its process killed) is started again, up to
    ``resources.max_failures`` times, and continues from its last Train checkpoint. Failures
    the driver saw itself end the trial at once (see the module docstring).
    """
    import ray.tune

    return ray.tune.FailureConfig(max_failures=sweep.resources.max_failures)


def final_failure(run: Any, launch_id: str) -> str | None:
    """Why the trial's MLflow ``run`` must not be started again, or None when it may.

    A FAILED run is final when its loss went non-finite (restored from its checkpoint, with
    the same data order and RNG states, it would only go non-finite again), or when a driver
    of this same launch recorded a training failure (Ray Train's ``WorkerGroupError``): Ray
    Train had already spent the workers' restarts on it. A failure around the training (Ray
    Train's controller, storage down) is not final, and failures of an earlier launch are
    tried again by ``--resume``.
    """
    from orchestration.tracking.tags import TAG_FAILURE, TAG_FAILURE_FINAL, TAG_FAILURE_LAUNCH

    if run.info.status != "FAILED":
        return None
    tags = run.data.tags
    if tags.get(TAG_FAILURE_FINAL) == "true" or tags.get(TAG_FAILURE_LAUNCH) == launch_id:
        return tags.get(TAG_FAILURE, "the trial failed")
    return None


def open_trial_run(
    context: SweepContext,
    sweep: SweepConfig,
    *,
    trial_id: str,
    dataset: Any,
    params: dict[str, Any],
    experiment: Any,
) -> tuple[Any, str]:
    """The trial's tracker and MLflow run id (found again on a restart, else created).

    A tracking server that is down is waited out for ``context.tracking_wait_s``. Raises
    :class:`TrialFailure` when the run ended in a :func:`final_failure`.
    """
    from orchestration.tracking.retries import quiet_client_retries
    from orchestration.tracking.tags import TAG_FORMAT, TAG_METRIC
    from orchestration.tracking.tracker import DatasetInput, Tracker, flatten

    quiet_client_retries()
    tracker = Tracker(
        context.tracking_uri,
        sweep.tracking.experiment or sweep.name,
        wait=context.tracking_wait_s,
        experiment_id=context.experiment_id,
    )
    existing = _earlier_run(context, tracker, trial_id)
    if existing is not None:
        reason = final_failure(existing, context.launch_id)
        if reason is not None:
            raise TrialFailure(f"not started again: {reason}")
    all_params = {
        **flatten(experiment.model_dump(mode="json")),
        "dataset": dataset.name,
        **{f"search.{k}": v for k, v in params.items()},
    }
    run_id = tracker.trial_run(
        existing=existing,
        sweep_id=context.sweep_id,
        parent_run_id=context.parent_run_id or "",
        trial_id=trial_id,
        name=trial_label(dataset.name, params),
        dataset=dataset.name,
        params=all_params,
        dataset_input=DatasetInput.of(dataset),
        extra_tags={TAG_FORMAT: dataset.format, TAG_METRIC: dataset.ranking_metric},
    )
    trial_run_ids.remember(context.sweep_id, trial_id, run_id)  # for the trial's restarts
    return tracker, run_id


def _earlier_run(context: SweepContext, tracker: Any, trial_id: str) -> Any | None:
    """The trial's MLflow run from an earlier start, or None at its first.

    Asked of Ray's key-value store first (:mod:`orchestration.running.trial_run_ids`), then,
    for a resumed sweep or where that store cannot be read, of MLflow by a search.
    """
    try:
        known = trial_run_ids.recall(context.sweep_id, trial_id)
    except trial_run_ids.Unavailable:
        return tracker.find_trial_run(context.sweep_id, trial_id)
    if known is not None:
        return tracker.get_run(known)
    return None if context.new_sweep else tracker.find_trial_run(context.sweep_id, trial_id)


def train_run_name(sweep_id: str, trial_id: str) -> str:
    """The Ray Train run name of a trial: stable across restarts, unique per sweep."""
    digest = hashlib.sha1(f"{sweep_id}/{trial_id}".encode()).hexdigest()[:8]
    return f"{trial_id}-{digest}"


def run_trial(tune_config: dict[str, Any], context: SweepContext) -> None:
    """The Tune trainable: every epoch reaches Tune through the worker's reports; raises when
    the trial failed (so Tune marks it ERROR with the reason).

    The training runs in a Ray Train worker group (``resources.runner: ray_train``) or in this
    process (``trial``); either way the trial's MLflow run is opened before and ended after.
    """
    import ray.tune

    from orchestration.running.storage import Storage
    from orchestration.tracking.tags import TAG_CHECKPOINT, TAG_FAILURE_FINAL

    sweep = context.sweep_config()
    dataset = sweep.dataset(tune_config[DATASET_KEY])
    params = trial_params(tune_config)
    trial_id = ray.tune.get_context().get_trial_id()
    work_dir = Path(context.work_dir) / trial_id
    experiment = trial_experiment(sweep, dataset, params, output_dir=work_dir)

    tracker = run_id = None
    if context.tracking_uri is not None:
        tracker, run_id = open_trial_run(
            context,
            sweep,
            trial_id=trial_id,
            dataset=dataset,
            params=params,
            experiment=experiment,
        )
    loop_config = {
        "experiment": experiment.model_dump(mode="json"),
        "work_dir": str(work_dir),
        "ranking_metric": dataset.ranking_metric,
        "tracking_uri": context.tracking_uri,
        "run_id": run_id,
        "tracking_wait_s": context.tracking_wait_s,
        "metrics_flush_every_s": sweep.tracking.flush_every_s,
        "early_stopping": sweep.search.scheduler.type != "fifo",
    }
    storage = Storage(context.storage_root, context.storage_endpoint)
    if sweep.resources.runner == "trial":
        nonfinite, checkpoint = _train_in_this_process(loop_config, tracker=tracker, run_id=run_id)
    else:
        nonfinite, checkpoint = _train_with_ray_train(
            loop_config, context, sweep, trial_id, storage, tracker=tracker, run_id=run_id
        )
    if nonfinite is not None:
        _record_failure(tracker, run_id, nonfinite, {TAG_FAILURE_FINAL: "true"})
        raise TrialFailure(nonfinite)
    if tracker is not None and run_id is not None:
        # A worker that hit a non-finite loss ended the run FAILED itself (see worker.py).
        reason = tracker.failure_reason(run_id)
        if reason is not None:
            raise TrialFailure(reason)
        tags = {}
        if checkpoint is not None:
            tags[TAG_CHECKPOINT] = _checkpoint_uri(storage, checkpoint)
        tracker.end_run(run_id, "FINISHED", tags=tags)  # the tags and the end: two requests


def _train_with_ray_train(
    loop_config: dict[str, Any],
    context: SweepContext,
    sweep: SweepConfig,
    trial_id: str,
    storage: Any,
    *,
    tracker: Any,
    run_id: str | None,
) -> tuple[str | None, Any]:
    """The trial's ``TorchTrainer``, whose every report ``TuneReportCallback`` forwards to
    Tune; returns (the non-finite loss reason or None, the last checkpoint or None)."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestration.running.lean_trainer import torch_trainer_class
    from orchestration.running.worker import train_loop
    from orchestration.tracking.tags import TAG_FAILURE_LAUNCH

    storage_path, filesystem = storage.ray_storage()
    resources = sweep.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = torch_trainer_class(placement_group_cleaner=context.placement_group_cleaner)(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers_per_trial,
            use_gpu=resources.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=resources.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name(context.sweep_id, trial_id),
            storage_path=f"{storage_path}/{context.sweep_id}/train",
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=checkpoint_config(sweep, ray.train.CheckpointConfig),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        # The training failed after the workers' own restarts: not retried within this launch.
        _record_failure(tracker, run_id, first_line(error), {TAG_FAILURE_LAUNCH: context.launch_id})
        raise
    except Exception as error:
        # Ray Train failed around the training, not in it: its controller could not start or
        # write its state, typically to storage that is down. Tune's restarts of the trial
        # (resources.max_failures) try again, from the last registered checkpoint.
        reason = f"Ray Train failed around the training: {ray_error_reason(error)}"
        _record_failure(tracker, run_id, reason, {})
        raise
    metrics = dict(result.metrics or {})
    return metrics.get(NONFINITE_KEY), result.checkpoint


def _train_in_this_process(
    loop_config: dict[str, Any], *, tracker: Any, run_id: str | None
) -> tuple[str | None, Any]:
    """The one worker in this Tune process (``resources.runner: trial``), reporting to Tune
    itself; returns (the non-finite loss reason or None, the last checkpoint or None).

    A failure is recorded in the run without ending its retries: Tune starts the trial again
    (``resources.max_failures`` times, as Ray Train would restart its worker) from the last
    checkpoint Tune registered.
    """
    import ray.tune

    from orchestration.running.worker import train_loop, tune_reporting

    try:
        nonfinite = train_loop(loop_config, tune_reporting())
    except Exception as error:
        _record_failure(tracker, run_id, first_line(error), {})
        raise
    return nonfinite, ray.tune.get_checkpoint()


def checkpoint_config(sweep: SweepConfig, config_class: Any) -> Any:
    """The checkpoints a trial keeps (``storage.num_to_keep``, the best by score and the
    latest), as Ray Train's or Ray Tune's ``CheckpointConfig``."""
    return config_class(
        num_to_keep=sweep.storage.num_to_keep,
        checkpoint_score_attribute="score",
        checkpoint_score_order="max",
    )


def _record_failure(tracker: Any, run_id: str | None, reason: str, tags: dict[str, str]) -> None:
    """End the trial's run FAILED with ``reason`` and ``tags``; a tracking server that
    stays down must not hide the trial's own error, which the caller raises next."""
    if tracker is None or run_id is None:
        return
    try:
        tracker.end_run(run_id, "FAILED", reason=reason, tags=tags)
    except Exception as error:
        logger.warning("could not record the failure in MLflow run %s: %s", run_id, error)


def _checkpoint_uri(storage: Any, checkpoint: Any) -> str:
    path = checkpoint.path
    return f"s3://{path}" if storage.is_s3 and not path.startswith("s3://") else path
