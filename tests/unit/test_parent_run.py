"""The sweep's parent MLflow run, in a real SQLite tracking store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestration.definition.trial_experiments import trial_experiment
from orchestration.running.parent_run import log_parent
from orchestration.running.trial import open_trial_run
from orchestration.tracking.tracker import Tracker
from tests.unit.test_trial_restarts import context, sweep_config


def test_the_parent_run_creates_the_datasets_its_trials_then_link(tmp_path):
    """Trials that start together would otherwise race to create the same MLflow dataset
    (a unique-key error, a retry after a second's wait)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = sweep_config(tmp_path)
    tracker = Tracker(store, "restarts")
    parent = tracker.client.create_run(tracker.experiment_id).info.run_id
    log_parent(tracker, parent, sweep, tmp_path / "sweep.yaml")
    inputs = tracker.client.get_run(parent).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.source) for i in inputs] == [
        ("coco (coco train)", str(tmp_path / "coco"))
    ]

    dataset = sweep.datasets[0]
    trial_tracker, run_id = open_trial_run(
        dataclasses.replace(context(store, sweep), experiment_id=tracker.experiment_id),
        sweep,
        trial_id="t1",
        dataset=dataset,
        params={},
        experiment=trial_experiment(sweep, dataset, {}, output_dir=Path("unused")),
    )
    trial_tracker.run_details_logged(run_id)  # sent in the background
    trial_inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in trial_inputs] == [inputs[0].dataset.digest]
