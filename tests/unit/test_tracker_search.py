"""A sweep's runs are found whatever their number: every page of MLflow's search is read.

A real SQLite tracking store; the page size is made small so that a few runs span pages as a
thousand-trial sweep's do at the default size.
"""

from __future__ import annotations

import pytest

import orchestration.tracking.run_search as run_search
from orchestration.tracking.tags import TAG_KIND, TAG_SWEEP_ID, TAG_TRIAL_ID
from orchestration.tracking.tracker import Tracker


@pytest.fixture
def tracker(tmp_path, monkeypatch) -> Tracker:
    monkeypatch.setattr(run_search, "SEARCH_PAGE_SIZE", 2)
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


@pytest.mark.parametrize("parts", [2, 3])
def test_find_runs_in_parts_reads_every_page_of_every_part(tracker, parts):
    """The sweep's end reads its trial runs from a server as several searches at once."""
    ours = trial_runs(tracker, "big", 7)
    trial_runs(tracker, "other", 3)
    found = tracker.find_runs(parts=parts, **{TAG_SWEEP_ID: "big", TAG_KIND: "trial"})
    assert sorted(run.info.run_id for run in found) == sorted(ours)  # each once
    assert tracker.find_runs(parts=parts, **{TAG_SWEEP_ID: "nowhere"}) == []


def test_a_server_is_searched_in_parts_and_a_file_in_one(tracker):
    assert tracker.search_parts == 1  # SQLite: read in this process, parts would take turns
    assert run_search.search_parts("http://127.0.0.1:5000") == run_search.SERVER_SEARCH_PARTS
    assert run_search.search_parts("https://mlflow.example.org") > 1


def test_stale_runs_past_the_first_page_are_closed(tracker):
    ours = trial_runs(tracker, "big", 5)
    closed = tracker.close_stale_runs("big", keep=ours[:1])
    assert sorted(closed) == sorted(ours[1:])
    statuses = {tracker.client.get_run(run_id).info.status for run_id in ours[1:]}
    assert statuses == {"KILLED"}


def test_the_sweeps_end_takes_each_trials_newest_run_whatever_the_parts_order(tracker):
    """A trial that opened a second run (a resumed sweep whose first run was lost) is
    represented by the newer one, though a search in parts returns the older part first."""
    from orchestration.running.sweep_run import _run_of_trial

    def run(trial_id: str, start_time: int) -> str:
        tags = {TAG_SWEEP_ID: "big", TAG_TRIAL_ID: trial_id, TAG_KIND: "trial"}
        created = tracker.client.create_run(tracker.experiment_id, start_time=start_time, tags=tags)
        return created.info.run_id

    older = run("t0", 1_000)
    others = [run(f"t{i}", 2_000 + i) for i in range(1, 4)]
    newer = run("t0", 9_000)
    found = tracker.find_runs(parts=2, **{TAG_SWEEP_ID: "big", TAG_KIND: "trial"})
    order = [r.info.run_id for r in found]
    assert order.index(older) < order.index(newer)  # the older part came first
    run_of = _run_of_trial(found)
    assert run_of["t0"] == newer
    assert sorted(run_of.values()) == sorted([newer, *others])


@pytest.mark.parametrize("parts", [1, 3])
def test_the_cyclic_collector_is_off_while_runs_are_read_and_as_it_was_after(
    tracker, monkeypatch, parts
):
    """A read of many runs builds tens of thousands of objects; Python's cyclic collector,
    scanning them again and again, was 40% of ``compare``'s time at 1,000 runs."""
    import gc

    trial_runs(tracker, "big", 5)
    seen: list[bool] = []
    search = tracker.client.search_runs

    def recording(*args, **kwargs):
        seen.append(gc.isenabled())
        return search(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "search_runs", recording)
    assert gc.isenabled()
    assert len(tracker.find_runs(parts=parts, **{TAG_SWEEP_ID: "big"})) == 5
    assert seen and not any(seen)  # off in every request, the parts' threads included
    assert gc.isenabled()  # back on
    gc.disable()
    try:
        tracker.find_runs(parts=parts, **{TAG_SWEEP_ID: "big"})
        assert not gc.isenabled()  # left off by whoever turned it off
    finally:
        gc.enable()
