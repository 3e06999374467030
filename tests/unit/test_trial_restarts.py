"""When Ray Tune may start a trial again, and what a restarted trial driver does.

Tune restarts a trial whose driver died (``trial_failure_config``), counting failures only;
the platform keeps it from repeating a failure it already recorded. The MLflow runs live in a
real SQLite tracking store and the trials are Ray Tune's own ``Trial`` objects; the restart
of a killed driver on a real cluster is in ``tests/integration/test_fault_tolerance.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from ray.tune.experiment import Trial

from orchestration.definition.sweep_config import SweepConfig
from orchestration.definition.trial_experiments import trial_experiment
from orchestration.definition.trial_names import NONFINITE_KEY
from orchestration.running.trial import (
    SweepContext,
    TrialFailure,
    final_failure,
    open_trial_run,
    trial_failure_config,
)
from orchestration.tracking.run_closing import RunCloser
from orchestration.tracking.tags import TAG_FAILURE, TAG_FAILURE_FINAL, TAG_FAILURE_LAUNCH
from orchestration.tracking.tracker import Tracker
from orchestration.tracking.trial_logging import MlflowTrialLogger


def sweep_config(tmp_path: Path, **resources) -> SweepConfig:
    return SweepConfig.model_validate(
        {
            "name": "restarts",
            "datasets": [
                {
                    "name": "coco",
                    "format": "coco",
                    "root": str(tmp_path / "coco"),
                    "num_classes": 2,
                    "synthetic": True,
                }  # fmt: skip
            ],
            "resources": resources,
            "output_dir": str(tmp_path / "out"),
        }
    )


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def context(store: str, sweep: SweepConfig, *, launch_id: str = "launch-1") -> SweepContext:
    return SweepContext(
        sweep=sweep.model_dump(mode="json"),
        sweep_id="restarts-1",
        parent_run_id=None,
        tracking_uri=store,
        storage_root="unused",
        storage_endpoint=None,
        work_dir="unused",
        launch_id=launch_id,
    )


def start(store: str, sweep: SweepConfig, trial_id: str, *, launch_id: str = "launch-1"):
    """What a trial driver does first: find or open the trial's MLflow run."""
    dataset = sweep.datasets[0]
    experiment = trial_experiment(sweep, dataset, {}, output_dir=Path("unused"))
    tracker, run_id = open_trial_run(
        context(store, sweep, launch_id=launch_id),
        sweep,
        trial_id=trial_id,
        dataset=dataset,
        params={},
        experiment=experiment,
    )
    tracker.run_details_logged(run_id)  # not left sending after the test's store is gone
    return tracker, run_id


def test_tune_restarts_a_trial_as_often_as_ray_train_restarts_its_workers(tmp_path):
    assert trial_failure_config(sweep_config(tmp_path)).max_failures == 2  # the default
    assert trial_failure_config(sweep_config(tmp_path, max_failures=5)).max_failures == 5
    assert trial_failure_config(sweep_config(tmp_path, max_failures=0)).max_failures == 0


def test_each_launch_of_a_sweep_has_its_own_id(tmp_path, store):
    sweep = sweep_config(tmp_path)
    first = SweepContext(sweep.model_dump(mode="json"), "s", None, store, "r", None, "w")
    second = SweepContext(sweep.model_dump(mode="json"), "s", None, store, "r", None, "w")
    assert first.launch_id and first.launch_id != second.launch_id


def tune_trial() -> Trial:
    return Trial("run_trial", config={"dataset": "coco"}, stub=True, max_failures=2)


def fail_once(trial: Trial) -> None:
    """What ``Trial.handle_error`` counts for an exception the trial driver raised."""
    trial.run_metadata.num_failures += 1


def test_a_nonfinite_loss_takes_away_the_trials_tune_retries(tmp_path, store):
    closer = RunCloser(Tracker(store, "restarts"), "restarts-1")
    healthy, diverged = tune_trial(), tune_trial()
    closer.on_trial_result(0, [], healthy, {"epoch": 1, "score": 0.3})
    closer.on_trial_result(0, [], diverged, {NONFINITE_KEY: "loss is nan at iteration 7"})
    for trial in (healthy, diverged):
        fail_once(trial)
    assert healthy.should_recover()  # Tune's own decision: a lost driver is started again
    assert not diverged.should_recover()  # ends at once


def test_a_restart_continues_the_same_run_without_the_tags_of_its_end(tmp_path, store):
    sweep = sweep_config(tmp_path)
    tracker, run_id = start(store, sweep, "t1")
    # A failure an earlier launch recorded (--resume tries it again), and the KILLED end a
    # resumed sweep gives to runs its dead driver left RUNNING.
    tracker.end_run(run_id, "FAILED", reason="workers failed", tags={TAG_FAILURE_LAUNCH: "old"})
    again, same = start(store, sweep, "t1")
    assert same == run_id
    run = again.client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert not {TAG_FAILURE, TAG_FAILURE_LAUNCH} & set(run.data.tags)
    again.close_stale_runs("restarts-1")
    assert start(store, sweep, "t1")[1] == run_id
    assert TAG_FAILURE not in again.client.get_run(run_id).data.tags


def test_a_nonfinite_loss_is_never_trained_again(tmp_path, store):
    sweep = sweep_config(tmp_path)
    tracker, run_id = start(store, sweep, "t1")
    # Rank 0's logger ends the run as the worker does when the engine raises.
    logger = MlflowTrialLogger(store, run_id, log_every_iters=1, ranking_metric="bbox_mAP")
    logger.fail("loss is nan at iteration 7\nmore detail")
    run = tracker.client.get_run(run_id)
    assert run.data.tags[TAG_FAILURE_FINAL] == "true"
    assert final_failure(run, "any launch") == "loss is nan at iteration 7"
    for launch in ("launch-1", "a later --resume"):
        with pytest.raises(TrialFailure, match="loss is nan at iteration 7"):
            start(store, sweep, "t1", launch_id=launch)
    assert tracker.client.get_run(run_id).info.status == "FAILED"  # not reopened


def test_a_failure_recorded_in_this_launch_is_not_retried_within_it(tmp_path, store):
    sweep = sweep_config(tmp_path)
    tracker, run_id = start(store, sweep, "t1", launch_id="launch-1")
    tracker.end_run(
        run_id, "FAILED", reason="Training failed", tags={TAG_FAILURE_LAUNCH: "launch-1"}
    )
    with pytest.raises(TrialFailure, match="Training failed"):
        start(store, sweep, "t1", launch_id="launch-1")
    # --resume (a new launch) tries it again, into the same run.
    _, again = start(store, sweep, "t1", launch_id="launch-2")
    assert again == run_id
    assert tracker.client.get_run(run_id).info.status == "RUNNING"


def test_runs_that_may_start_again(tmp_path, store):
    sweep = sweep_config(tmp_path)
    tracker, run_id = start(store, sweep, "t1")
    assert final_failure(tracker.client.get_run(run_id), "launch-1") is None  # RUNNING
    tracker.end_run(run_id, "FAILED", reason="the trial failed")  # closed by the sweep driver
    assert final_failure(tracker.client.get_run(run_id), "launch-1") is None


def test_a_trial_uses_the_experiment_its_sweep_driver_found(tmp_path, store, monkeypatch):
    """The driver found or created the experiment: a trial does not look it up again."""
    sweep = sweep_config(tmp_path)
    experiment_id = Tracker(store, "restarts").experiment_id
    from mlflow.tracking import MlflowClient

    def no_lookup(self, name):
        raise AssertionError(f"experiment {name!r} looked up again")

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", no_lookup)
    dataset = sweep.datasets[0]
    tracker, run_id = open_trial_run(
        dataclasses.replace(context(store, sweep), experiment_id=experiment_id),
        sweep,
        trial_id="t1",
        dataset=dataset,
        params={},
        experiment=trial_experiment(sweep, dataset, {}, output_dir=Path("unused")),
    )
    tracker.run_details_logged(run_id)
    assert tracker.experiment_id == experiment_id
    assert tracker.client.get_run(run_id).info.experiment_id == experiment_id
