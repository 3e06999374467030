"""A starting trial finds its earlier MLflow run through Ray's key-value store, not a search.

The first start of a trial of a new sweep opens its run without searching MLflow (a search
of the experiment by tags, whose time grows with its runs); a restart finds the run's id in
Ray's store and reads that one run; a resumed sweep, or a process outside Ray, searches as
before. A real local Ray (its GCS holds the store) and a real SQLite tracking store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray

from orchestration.running import trial_run_ids
from orchestration.running.trial import SweepContext, TrialFailure, open_trial_run
from orchestration.tracking.tracker import Tracker
from orchestration.tracking.trial_logging import MlflowTrialLogger
from tests.unit.test_trial_restarts import context, start, sweep_config


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def searches(monkeypatch) -> list[dict]:
    """Every search of MLflow for runs by tags, as its tags (the calls go through)."""
    seen: list[dict] = []
    find_runs = Tracker.find_runs

    def counted(self, **kwargs):
        seen.append(kwargs)
        return find_runs(self, **kwargs)

    monkeypatch.setattr(Tracker, "find_runs", counted)
    return seen


def open_run(store: str, sweep, trial_id: str, ctx: SweepContext):
    dataset = sweep.datasets[0]
    from orchestration.definition.trial_experiments import trial_experiment

    experiment = trial_experiment(sweep, dataset, {}, output_dir=Path("unused"))
    tracker, run_id = open_trial_run(
        ctx, sweep, trial_id=trial_id, dataset=dataset, params={}, experiment=experiment
    )
    tracker.run_details_logged(run_id)  # not left sending after the test's store is gone
    return tracker, run_id


def test_outside_ray_a_start_searches(tmp_path, store, searches):
    assert not ray.is_initialized()  # first in this file: before the module's Ray starts
    with pytest.raises(trial_run_ids.Unavailable):
        trial_run_ids.recall("any", "t1")
    sweep = sweep_config(tmp_path)
    start(store, sweep, "t1")
    assert [s.get("autoassign.trial_id") for s in searches] == ["t1"]


def test_a_new_sweeps_trials_start_without_a_search_and_restart_into_their_run(
    local_ray, tmp_path, store, searches
):
    sweep = sweep_config(tmp_path)
    ctx = dataclasses.replace(context(store, sweep), sweep_id="new-1", new_sweep=True)
    tracker, first = open_run(store, sweep, "t1", ctx)
    _, other = open_run(store, sweep, "t2", ctx)
    assert searches == []  # two first starts, no search
    assert first != other
    assert trial_run_ids.recall("new-1", "t1") == first

    # A restart (the trial's driver died) continues its run, found by id.
    tracker.end_run(first, "FAILED", reason="the driver died")
    _, again = open_run(store, sweep, "t1", ctx)
    assert again == first and searches == []
    assert tracker.client.get_run(first).info.status == "RUNNING"

    # A failure that cannot be helped is found the same way, and refused.
    MlflowTrialLogger(store, first, log_every_iters=1, ranking_metric="bbox_mAP").fail("nan")
    with pytest.raises(TrialFailure, match="nan"):
        open_run(store, sweep, "t1", ctx)
    assert searches == []

    trial_run_ids.forget_sweep("new-1")
    assert trial_run_ids.recall("new-1", "t1") is None
    assert trial_run_ids.recall("new-1", "t2") is None


def test_a_resumed_sweep_searches_for_runs_of_its_earlier_launch(
    local_ray, tmp_path, store, searches
):
    sweep = sweep_config(tmp_path)
    first_launch = dataclasses.replace(context(store, sweep), sweep_id="resumed-1", new_sweep=True)
    _, earlier = open_run(store, sweep, "t1", first_launch)
    trial_run_ids.forget_sweep("resumed-1")  # that launch's Ray is gone
    resumed = dataclasses.replace(first_launch, new_sweep=False, launch_id="launch-2")
    _, found = open_run(store, sweep, "t1", resumed)
    assert found == earlier
    assert [s.get("autoassign.trial_id") for s in searches] == ["t1"]
    _, again = open_run(store, sweep, "t1", resumed)  # and remembers it for its restarts
    assert again == earlier and len(searches) == 1
