"""Early stopping compares trials of one dataset only (orchestration.definition.schedulers).

The trials are Tune's own ``Trial`` objects; the scheduler is driven with the results a sweep
reports (``epoch``, ``score``). No Ray cluster is needed: ASHA's decisions are pure
bookkeeping over the reported scores.
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestration.definition.schedulers import PerDatasetScheduler, build_scheduler
from orchestration.definition.sweep_config import SchedulerConfig

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def make_trial(trial_id: str, dataset: str) -> Trial:
    return Trial("run_trial", config={"dataset": dataset}, trial_id=trial_id, stub=True)


def decisions(scheduler, results):
    """Add every trial, then report ``(trial, score)`` at epoch 1; the decisions in order."""
    scheduler.set_search_properties("score", "max")
    trials = {}
    for trial_id, dataset, _ in results:
        trials[trial_id] = make_trial(trial_id, dataset)
        scheduler.on_trial_add(None, trials[trial_id])
    return [
        scheduler.on_trial_result(None, trials[trial_id], {"epoch": 1, "score": score})
        for trial_id, _, score in results
    ]


# COCO AP and VOC mAP live on different scales: the VOC trials are all below the COCO ones.
RESULTS = [("c1", "coco", 0.60), ("c2", "coco", 0.20), ("v1", "voc", 0.05), ("v2", "voc", 0.04)]
OPTIONS = {"time_attr": "epoch", "max_t": 4, "grace_period": 1, "reduction_factor": 2}


def test_each_dataset_is_stopped_against_its_own_trials():
    per_dataset = PerDatasetScheduler(OPTIONS)
    assert decisions(per_dataset, RESULTS) == [CONTINUE, STOP, CONTINUE, STOP]
    assert per_dataset.stopped_count("coco") == 1 and per_dataset.stopped_count("voc") == 1


def test_one_shared_asha_would_stop_the_best_voc_trial():
    shared = ASHAScheduler(**OPTIONS)
    assert decisions(shared, RESULTS)[2] == STOP  # what PerDatasetScheduler prevents


def test_build_scheduler():
    assert type(build_scheduler(SchedulerConfig(type="fifo"), max_epochs=12)).__name__ == (
        "FIFOScheduler"
    )
    asha = build_scheduler(SchedulerConfig(type="asha", grace_period=3), max_epochs=12)
    assert isinstance(asha, PerDatasetScheduler)
    assert asha.asha_options["grace_period"] == 3 and asha.asha_options["max_t"] == 12
