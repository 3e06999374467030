"""A trial's new MLflow run: created before the trial goes on, its params and dataset input
sent in the background, and in the run before the run ends (real SQLite tracking store).

The tests hold the real ``log_batch`` back (or make it refuse) to see the order of things:
a slow or failing server cannot be made to answer at the exact moment needed for real.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestration.definition.trial_experiments import trial_experiment
from orchestration.running.trial import open_trial_run
from orchestration.tracking.tracker import flatten
from tests.unit.test_trial_restarts import context, sweep_config


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def open_run(store: str, tmp_path: Path, **context_changes):
    sweep = sweep_config(tmp_path)
    dataset = sweep.datasets[0]
    experiment = trial_experiment(sweep, dataset, {"train.lr": 0.02}, output_dir=Path("unused"))
    tracker, run_id = open_trial_run(
        dataclasses.replace(context(store, sweep), **context_changes),
        sweep,
        trial_id="t1",
        dataset=dataset,
        params={"train.lr": 0.02},
        experiment=experiment,
    )
    expected_params = len(flatten(experiment.model_dump(mode="json"))) + 2  # dataset, search.lr
    return tracker, run_id, expected_params


def test_the_run_is_open_before_its_params_arrive_and_ends_after_them(tmp_path, store, monkeypatch):
    release = threading.Event()
    calls: list[str] = []
    log_batch, set_terminated = MlflowClient.log_batch, MlflowClient.set_terminated

    def held_log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if params:
            assert release.wait(timeout=60), "the params were never let through"
        log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        calls.append("params" if params else "batch")

    def recorded_set_terminated(self, run_id, status=None, **kwargs):
        calls.append(f"end {status}")
        set_terminated(self, run_id, status=status, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", held_log_batch)
    monkeypatch.setattr(MlflowClient, "set_terminated", recorded_set_terminated)

    tracker, run_id, expected_params = open_run(store, tmp_path)
    run = tracker.client.get_run(run_id)  # the trial goes on while its params are on their way
    assert run.info.status == "RUNNING"
    assert run.data.tags["autoassign.trial_id"] == "t1"
    assert run.data.params == {}

    ending = threading.Thread(target=tracker.end_run, args=(run_id, "FINISHED"))
    ending.start()
    release.set()
    ending.join(timeout=60)
    assert not ending.is_alive()

    assert calls == ["params", "end FINISHED"]
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(run.data.params) == expected_params
    assert run.data.params["search.train.lr"] == "0.02"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["coco (coco train)"]
    # A reused trial process opens hundreds of runs: no sending thread outlives its run.
    assert not [t for t in threading.enumerate() if t.name.startswith("mlflow-run-details")]


def test_params_the_store_refused_fail_the_run_end_and_the_run_can_still_be_failed(
    tmp_path, store, monkeypatch
):
    log_batch = MlflowClient.log_batch

    def refusing_log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if params:
            raise MlflowException("param value too long for this store")
        log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", refusing_log_batch)
    tracker, run_id, _ = open_run(store, tmp_path, tracking_wait_s=0.0)

    with pytest.raises(MlflowException, match="param value too long"):
        tracker.end_run(run_id, "FINISHED")
    assert tracker.client.get_run(run_id).info.status == "RUNNING"  # not FINISHED without them

    # What the trial driver does next (its failure recorded in the run) is not held up again.
    tracker.end_run(run_id, "FAILED", reason="params refused")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["autoassign.failure_reason"] == "params refused"
