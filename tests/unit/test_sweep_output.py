"""What a sweep's terminal shows and what goes to its log file, without Ray running: the
trial lines from the results Tune hands its callbacks, and the routing of the libraries'
loggers, prints and warnings. A real sweep's terminal is checked in
tests/integration/test_sweep.py."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.running.sweep_output import SweepOutput, say
from orchestration.running.trial_progress import TrialProgress, duration


@dataclass
class FinishedTrial:
    """What the callback reads of a Ray Tune ``Trial``: its id, name, config, error file."""

    trial_id: str
    name: str
    config: dict = field(default_factory=lambda: {"dataset": "coco"})
    error_file: str | None = None

    def __str__(self) -> str:
        return self.name


def result(epoch: int, seconds: float, **extra) -> dict:
    losses = {"train/loss": 1.5, "train/loss_pos": 1.25, "train/loss_neg": 0.094}
    return {"epoch": epoch, "time_total_s": seconds, **losses, **extra}


def progress(lines: list[str]) -> TrialProgress:
    return TrialProgress({"coco": "bbox_mAP"}, lambda config: 4, 3, write=lines.append)


def test_one_line_per_epoch_with_the_evaluation_and_an_eta():
    lines: list[str] = []
    callback = progress(lines)
    trial = FinishedTrial("t1", "coco·sigma=1")
    callback.on_trial_result(0, [], trial, result(1, 30.0))
    callback.on_trial_result(0, [], trial, result(1, 30.0))  # Tune sent it again
    callback.on_trial_result(0, [], trial, result(2, 60.0, bbox_mAP=0.25, score=0.25))
    callback.on_trial_result(0, [], trial, {"time_total_s": 61.0})  # no epoch: not a line
    assert lines == [
        "coco·sigma=1  epoch 1/4  loss 1.500 (pos 1.250, neg 0.094)  0:30 elapsed, ETA 1:30",
        "coco·sigma=1  epoch 2/4  loss 1.500 (pos 1.250, neg 0.094)  bbox_mAP 0.2500  "
        "1:00 elapsed, ETA 1:00",
    ]


def test_the_end_of_a_trial_finished_stopped_early_or_failed(tmp_path):
    lines: list[str] = []
    callback = progress(lines)
    done, stopped, failed = (FinishedTrial(f"t{i}", f"coco·lr={i}") for i in range(3))
    for epoch in range(1, 5):
        callback.on_trial_result(0, [], done, result(epoch, 30.0 * epoch, bbox_mAP=0.4))
    callback.on_trial_complete(0, [], done)
    callback.on_trial_result(0, [], stopped, result(1, 30.0))
    callback.on_trial_complete(0, [], stopped)
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nTrialFailure: loss is nan\n")
    failed.error_file = str(error_file)
    callback.on_trial_result(0, [], failed, result(1, 30.0))
    callback.on_trial_error(0, [], failed)
    assert [line for line in lines if line.endswith("trials ended)")] == [
        "coco·lr=0  finished: 4 epochs in 2:00, bbox_mAP 0.4000  (1/3 trials ended)",
        "coco·lr=1  stopped early by the scheduler after epoch 1/4 in 0:30  (2/3 trials ended)",
        "coco·lr=2  FAILED in epoch 2: TrialFailure: loss is nan (details: sweep.log)  "
        "(3/3 trials ended)",
    ]


def test_a_resumed_trial_and_the_workers_warnings_are_said_in_words():
    lines: list[str] = []
    callback = progress(lines)
    trial = FinishedTrial("t1", "coco·sigma=1")
    callback.on_trial_result(0, [], trial, result(1, 30.0))
    warning = "MLflow unreachable (connection refused); keeping metrics to retry"
    callback.on_trial_result(
        0, [], trial, result(2, 60.0, resumed_from_epoch=1, warnings=[warning])
    )
    assert lines[1:3] == [
        "coco·sigma=1  continued from its checkpoint of epoch 1 (its workers were started again)",
        f"coco·sigma=1  warning: {warning}",
    ]
    assert lines[3].startswith("coco·sigma=1  epoch 2/4  ")


def test_a_broken_line_never_raises_into_tune(caplog):
    def no_epochs(config):
        raise KeyError("dataset")

    lines: list[str] = []
    callback = TrialProgress({}, no_epochs, 1, write=lines.append)
    callback.on_trial_result(0, [], FinishedTrial("t1", "x"), {"epoch": 1, "train/loss": "?"})
    assert lines == ["x  epoch 1/?"]
    callback.on_trial_complete(0, [], object())  # not a trial at all: logged, not raised
    assert "no progress line for trial ?" in caplog.text


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3600 + 65)] == ["0:00", "1:00", "1:01", "1:01:05"]


def test_the_libraries_output_goes_to_the_log_file_and_the_projects_warnings_stay(tmp_path, capfd):
    log_path = tmp_path / "runs" / "x" / "sweep.log"
    mlflow_handlers, stdout = list(logging.getLogger("mlflow").handlers), sys.stdout
    with SweepOutput(log_path):
        logging.getLogger("ray.tune").info("Wrote the latest version of all result files")
        logging.getLogger("mlflow.pyfunc").warning("Passing a Python object ... CloudPickle")
        warnings.warn("Add type hints to the `predict` method", UserWarning, stacklevel=1)
        print("View detailed results here: /tmp/ray/x")  # what Tune prints in the driver
        logging.getLogger("orchestration.tracking").warning("MLflow unreachable; retrying")
        say("coco·sigma=1  epoch 1/4")
    print("after the sweep")
    out, err = capfd.readouterr()
    assert out == "coco·sigma=1  epoch 1/4\nafter the sweep\n"
    assert err == "WARNING orchestration.tracking: MLflow unreachable; retrying\n"
    text = log_path.read_text()
    for line in (
        "INFO ray.tune: Wrote the latest version of all result files",
        "WARNING mlflow.pyfunc: Passing a Python object ... CloudPickle",
        "Add type hints to the `predict` method",
        "INFO stdout: View detailed results here: /tmp/ray/x",
        "WARNING orchestration.tracking: MLflow unreachable; retrying",
        "INFO orchestration.terminal: coco·sigma=1  epoch 1/4",
    ):
        assert line in text, line
    # Everything is put back as it was.
    assert logging.getLogger("mlflow").handlers == mlflow_handlers
    assert sys.stdout is stdout


def test_verbose_leaves_the_libraries_output_on_the_terminal(tmp_path, capfd):
    log_path = tmp_path / "sweep.log"
    with SweepOutput(log_path, verbose=True):
        print("Trial status: 2 RUNNING")  # Tune's table
        logging.getLogger("autoassign.engine").warning("a library warning")
        say("coco·sigma=1  epoch 1/4")
    out, err = capfd.readouterr()
    assert out == "Trial status: 2 RUNNING\ncoco·sigma=1  epoch 1/4\n"
    assert "a library warning" in err
    assert "coco·sigma=1  epoch 1/4" in Path(log_path).read_text()
