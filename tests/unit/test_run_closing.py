"""The sweep driver's Tune callback that closes trial runs never raises into Tune.

The runs live in a real SQLite tracking store. The outage is a real unreachable server: the
tracker's client is pointed at a port nothing listens on, then back at the store. The same
against a real ``mlflow server`` that is stopped and started again is in
``tests/integration/test_fault_tolerance.py``.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from orchestration.tracking.retries import fail_fast_requests
from orchestration.tracking.run_closing import RunCloser
from orchestration.tracking.tags import (
    TAG_EARLY_STOPPED,
    TAG_FAILURE,
    TAG_KIND,
    TAG_SWEEP_ID,
    TAG_TRIAL_ID,
)
from orchestration.tracking.tracker import Tracker

SWEEP = "closing-1"


def closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed when the socket is


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "closing")


def trial_with_run(tracker: Tracker) -> tuple[Trial, str]:
    trial = Trial("run_trial", config={"dataset": "coco"}, stub=True)
    run = tracker.client.create_run(
        tracker.experiment_id,
        tags={TAG_SWEEP_ID: SWEEP, TAG_TRIAL_ID: trial.trial_id, TAG_KIND: "trial"},
    )
    return trial, run.info.run_id


def test_closes_early_stopped_and_errored_trials(tracker):
    closer = RunCloser(tracker, SWEEP)
    (stopped, stopped_run), (errored, errored_run) = (
        trial_with_run(tracker),
        trial_with_run(tracker),
    )
    closer.on_trial_complete(0, [], stopped)
    closer.on_trial_error(0, [], errored)
    run = tracker.client.get_run(stopped_run)
    assert run.info.status == "KILLED" and run.data.tags[TAG_EARLY_STOPPED] == "true"
    run = tracker.client.get_run(errored_run)
    assert run.info.status == "FAILED" and run.data.tags[TAG_FAILURE] == "the trial failed"
    assert not closer.pending


def test_completed_trials_are_closed_together_with_one_search(tracker, monkeypatch):
    """Tune calls on_trial_complete for every trial, and most ended their runs themselves:
    the trials completing within close_every seconds cost one search, not one each."""
    searches = []
    find_runs = tracker.find_runs

    def counted(**kwargs):
        searches.append(kwargs)
        return find_runs(**kwargs)

    monkeypatch.setattr(tracker, "find_runs", counted)
    closer = RunCloser(tracker, SWEEP, close_every=3600.0)
    finished = [trial_with_run(tracker) for _ in range(20)]
    for _, run_id in finished:  # their drivers ended them
        tracker.end_run(run_id, "FINISHED")
    stopped, stopped_run = trial_with_run(tracker)  # stopped early by the scheduler
    for trial, _ in finished:
        closer.on_trial_complete(0, [], trial)
    closer.on_trial_complete(0, [], stopped)
    closer.on_step_end(1, [])
    assert searches == [] and len(closer.pending) == 21  # waits for the others
    assert tracker.client.get_run(stopped_run).info.status == "RUNNING"

    closer.on_experiment_end([])
    assert len(searches) == 1 and not closer.pending
    run = tracker.client.get_run(stopped_run)
    assert run.info.status == "KILLED" and run.data.tags[TAG_EARLY_STOPPED] == "true"
    assert {tracker.client.get_run(r).info.status for _, r in finished} == {"FINISHED"}

    later, later_run = trial_with_run(tracker)
    closer = RunCloser(tracker, SWEEP, close_every=0.0)
    closer.on_trial_complete(0, [], later)
    closer.on_step_end(2, [])  # close_every passed
    assert len(searches) == 2 and tracker.client.get_run(later_run).info.status == "KILLED"
    closer.on_step_end(3, [])
    closer.on_experiment_end([])
    assert len(searches) == 2  # nothing pending, nothing searched


def test_an_unreachable_server_never_raises_into_tune_and_the_close_is_done_later(tracker, caplog):
    closer = RunCloser(tracker, SWEEP, retry_every=0.0, final_wait=0.0)
    stopped, stopped_run = trial_with_run(tracker)
    errored, errored_run = trial_with_run(tracker)
    store_client = tracker.client
    tracker.client = MlflowClient(closed_port_uri())
    with caplog.at_level(logging.WARNING, logger="orchestration.tracking.run_closing"):
        closer.on_trial_complete(0, [], stopped)
        closer.on_trial_error(0, [], errored)
        closer.on_step_end(1, [])
        closer.on_experiment_end([])  # final_wait 0: one more try, then the warning
    assert set(closer.pending) == {stopped.trial_id, errored.trial_id}
    assert f"the run of trial {stopped.trial_id} is closed (KILLED) once it answers" in caplog.text
    assert "could not be closed" in caplog.text

    tracker.client = store_client  # the server answers again
    closer.on_step_end(2, [])
    assert not closer.pending
    assert store_client.get_run(stopped_run).info.status == "KILLED"
    assert store_client.get_run(errored_run).info.status == "FAILED"
    assert "MLflow reachable again" in caplog.text


def test_fail_fast_requests_puts_mlflows_settings_back(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with fail_fast_requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
