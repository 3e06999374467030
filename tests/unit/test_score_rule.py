"""A score only after an evaluation, and early stopping only on evaluated epochs.

An epoch the trainer does not evaluate reports no ``score``
(orchestration.running.worker), ASHA never decides on such a result
(orchestration.definition.schedulers), and a sweep whose ASHA rungs fall on epochs without an
evaluation is refused before Ray starts (orchestration.definition.sweep_config), naming
``search.scheduler.grace_period`` and ``eval.every_epochs``. The refusal goes through the
real sweep CLI; the scheduler is Ray's own, driven with Tune's own ``Trial`` objects, which
need no Ray cluster.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from autoassign.engine import TrainState
from autoassign.errors import ConfigError
from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.evaluated_rungs import asha_rungs
from orchestration.definition.schedulers import TUNE_ENV, build_scheduler
from orchestration.definition.sweep_config import SchedulerConfig
from orchestration.running.worker import RayReporter, Reporting

REPO = Path(__file__).resolve().parents[2]
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def sweep_file(folder: Path, *, scheduler: dict, every_epochs: int = 4, **extra) -> Path:
    """A one-dataset sweep of 8 epochs, evaluated every ``every_epochs``."""
    config = {
        "name": "tiny",
        "base": {
            "model": {"backbone": {"depth": 18, "norm": "gn"}},
            "train": {"schedule": None, "epochs": 8, "milestones": [6]},
            "eval": {"every_epochs": every_epochs},
            "device": "cpu",
        },
        "datasets": [
            {
                "name": "shapes",
                "format": "coco",
                "root": "data/shapes",
                "num_classes": 1,
                "synthetic": {"images": 4, "image_size": 64},
            },
        ],
        "search": {"scheduler": scheduler},
        **extra,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dry_run(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m orchestration.sweep CONFIG [overrides] --dry-run``: checks, starts no Ray."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # the file says where a sweep goes
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "orchestration.sweep", str(config), *overrides, "--dry-run"],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_default_grace_period_with_sparse_evaluation_is_refused(tmp_path):
    refused = dry_run(sweep_file(tmp_path, scheduler={"type": "asha"}))
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    message = refused.stderr
    assert "search.scheduler.grace_period 1" in message and "eval.every_epochs 4" in message
    assert "compare trials after epochs 1, 2, 4 (below max_t 8)" in message
    assert "epoch(s) 1, 2 would be compared without an evaluation" in message
    assert "set search.scheduler.grace_period: 4" in message


def test_rungs_on_evaluated_epochs_pass(tmp_path):
    config = sweep_file(tmp_path, scheduler={"type": "asha", "grace_period": 4})
    planned = dry_run(config)
    assert planned.returncode == 0, planned.stderr
    assert "shapes" in planned.stdout
    # The same file, refused for a grace period the CLI sets, and passing again with every epoch
    # evaluated: the check sees the values the sweep will run with.
    assert dry_run(config, "search.scheduler.grace_period=3").returncode == 2
    every_epoch = sweep_file(tmp_path, scheduler={"type": "asha"}, every_epochs=1)
    assert dry_run(every_epoch).returncode == 0


def test_each_trial_is_checked_with_its_own_evaluation_rhythm(tmp_path):
    """A dataset override or a searched value that changes ``eval.every_epochs`` is checked."""
    asha = {"type": "asha", "grace_period": 4}
    searched = sweep_file(
        tmp_path, scheduler=asha, search_space={"eval.every_epochs": {"grid": [2, 3]}}
    )
    with pytest.raises(ConfigError, match=r"dataset 'shapes', eval.every_epochs=3 evaluates"):
        load_sweep_config(searched)
    overridden = sweep_file(tmp_path, scheduler=asha)
    data = yaml.safe_load(overridden.read_text())
    data["datasets"][0]["overrides"] = {"eval.every_epochs": 0}
    overridden.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"only after its last epoch, 8 \(eval.every_epochs 0\)"):
        load_sweep_config(overridden)
    # The last epoch is always evaluated: a trial that ends on a rung epoch is fine there.
    shorter = sweep_file(
        tmp_path, scheduler=asha, every_epochs=0, search_space={"train.epochs": {"grid": [4]}}
    )
    assert load_sweep_config(shorter).search.scheduler.grace_period == 4


@pytest.mark.parametrize(
    ("grace_period", "reduction_factor", "max_epochs"),
    [(1, 2, 16), (4, 2, 12), (3, 1.5, 16), (8, 3, 8), (2, 4, 100)],
)
def test_the_rungs_are_those_of_the_scheduler_the_sweep_builds(
    grace_period, reduction_factor, max_epochs
):
    config = SchedulerConfig(
        type="asha", grace_period=grace_period, reduction_factor=reduction_factor
    )
    scheduler = build_scheduler(config, max_epochs=max_epochs)
    scheduler.set_search_properties("score", "max")
    asha = scheduler.scheduler_of(make_trial("t0"))
    (bracket,) = asha._brackets
    ray_rungs = {math.ceil(milestone) for milestone, _ in bracket._rungs}
    assert asha_rungs(config, max_epochs) == sorted(r for r in ray_rungs if r < asha._max_t)


def make_trial(trial_id: str) -> Trial:
    return Trial("run_trial", config={"dataset": "shapes"}, trial_id=trial_id, stub=True)


def test_asha_decides_on_evaluated_epochs_only():
    """Evaluated after epoch 4 (grace period 4): the epochs before carry no score."""
    scheduler = build_scheduler(SchedulerConfig(type="asha", grace_period=4), max_epochs=8)
    scheduler.set_search_properties("score", "max")
    good, bad, failing = (make_trial(name) for name in ("good", "bad", "failing"))
    for trial in (good, bad, failing):
        scheduler.on_trial_add(None, trial)
    for epoch in (1, 2, 3):
        for trial in (good, bad):
            assert scheduler.on_trial_result(None, trial, {"epoch": epoch}) == CONTINUE
    assert scheduler.on_trial_result(None, good, {"epoch": 4, "score": 0.6}) == CONTINUE
    # A failure report on an epoch without an evaluation carries NaN: ASHA must not take it
    # as the trial's result at the rung (Ray's own ASHA records it, as a pass).
    assert scheduler.on_trial_result(None, failing, {"epoch": 5, "score": math.nan}) == CONTINUE
    (rung_4,) = [
        recorded
        for milestone, recorded in scheduler.scheduler_of(good)._brackets[0]._rungs
        if milestone == 4
    ]
    assert rung_4 == {"good": 0.6}
    assert scheduler.on_trial_result(None, bad, {"epoch": 4, "score": 0.2}) == STOP
    assert scheduler.stopped_count("shapes") == 1


def test_tune_ends_the_sweep_on_a_result_without_score_unless_told_not_to(monkeypatch):
    """Why the sweep driver needs TUNE_ENV: Tune's own check, on a stand-in controller."""
    controller = types.SimpleNamespace(
        _metric="score", _scheduler_alg=FIFOScheduler(), _search_alg=BasicVariantGenerator()
    )
    unevaluated = {"epoch": 1, "iteration": 10, "train/loss": 1.5}
    monkeypatch.delenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", raising=False)
    with pytest.raises(ValueError, match="did not include the specified metric"):
        TuneController._validate_result_metrics(controller, unevaluated)
    for name, value in TUNE_ENV.items():
        monkeypatch.setenv(name, value)
    TuneController._validate_result_metrics(controller, unevaluated)


def test_an_epoch_without_evaluation_reports_no_score():
    """``ray.train.report`` only works inside a Ray Train worker (and ``ray.tune.report``
    inside a trial), so the reporter is given one that keeps what it was given; everything
    before it is the reporter's own code."""
    reports = []
    reporting = Reporting(
        report=lambda metrics, checkpoint=None: reports.append(metrics),
        get_checkpoint=lambda: None,
        checkpoint_from_directory=lambda path: path,
        rank=0,
    )
    reporter = RayReporter("bbox_mAP", reporting=reporting)
    state = TrainState(epoch_losses={"loss": 1.25})
    for epoch, metrics in ((1, {}), (2, {"bbox_mAP": 0.31, "bbox_mAP_50": 0.5}), (3, {})):
        state.epoch, state.epochs_completed, state.iteration = epoch - 1, epoch, 10 * epoch
        reporter.on_epoch_end(state, metrics)
    first, evaluated, after = reports
    assert "score" not in first and "score" not in after  # neither 0 nor carried forward
    assert first == {"epoch": 1, "iteration": 10, "train/loss": 1.25}
    assert evaluated["score"] == 0.31 and evaluated["bbox_mAP_50"] == 0.5
    assert math.isnan(reporter.score)  # the last epoch reported had no evaluation
    reporter.on_epoch_end(state, {"bbox_mAP": math.nan})
    assert reports[-1]["score"] == 0.0  # evaluated, but no finite value: the lowest AP
