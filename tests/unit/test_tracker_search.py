"""A sweep's runs are found whatever their number: every page of MLflow's search is read.

A real SQLite tracking store; the page size is made small so that a few runs span pages as a
thousand-trial sweep's do at the default size.
"""

from __future__ import annotations

import pytest

import orchestration.tracking.tracker as tracker_module
from orchestration.tracking.tags import TAG_KIND, TAG_SWEEP_ID, TAG_TRIAL_ID
from orchestration.tracking.tracker import Tracker


@pytest.fixture
def tracker(tmp_path, monkeypatch) -> Tracker:
    monkeypatch.setattr(tracker_module, "SEARCH_PAGE_SIZE", 2)
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "search")


def trial_runs(tracker: Tracker, sweep_id: str, count: int) -> list[str]:
    return [
        tracker.client.create_run(
            tracker.experiment_id,
            tags={TAG_SWEEP_ID: sweep_id, TAG_TRIAL_ID: f"t{i}", TAG_KIND: "trial"},
        ).info.run_id
        for i in range(count)
    ]


def test_find_runs_reads_every_page(tracker):
    ours = trial_runs(tracker, "big", 5)
    trial_runs(tracker, "other", 2)
    found = tracker.find_runs(**{TAG_SWEEP_ID: "big", TAG_KIND: "trial"})
    assert sorted(run.info.run_id for run in found) == sorted(ours)
    assert [r.info.run_id for r in tracker.find_runs(**{TAG_TRIAL_ID: "t3"})] != []


def test_stale_runs_past_the_first_page_are_closed(tracker):
    ours = trial_runs(tracker, "big", 5)
    closed = tracker.close_stale_runs("big", keep=ours[:1])
    assert sorted(closed) == sorted(ours[1:])
    statuses = {tracker.client.get_run(run_id).info.status for run_id in ours[1:]}
    assert statuses == {"KILLED"}
