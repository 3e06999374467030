"""A trial's metric points are sent together every ``tracking.flush_every_s``, and a worker
killed while points wait loses none of them, nor logs any twice.

The tracking store is a real SQLite file; the training is the engine's own on a tiny synthetic
COCO dataset, run by the trial worker's ``train_loop`` (``orchestration.running.worker``) with
a ``Reporting`` that keeps each reported checkpoint in a folder, as Ray does in its storage.
The kill is a real SIGKILL, which the worker process sends itself right after Ray would have
registered the second epoch's checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autoassign.data.synthetic import write_synthetic
from orchestration.running.worker import Reporting, train_loop
from orchestration.tracking import metric_buffer
from orchestration.tracking.metric_buffer import PENDING_FILE, MetricBuffer, read_pending
from orchestration.tracking.trial_logging import MlflowTrialLogger
from tests.unit.test_engine import tiny_config

EPOCHS = 3
ITERS_PER_EPOCH = 4  # 8 images at batch 2


@pytest.fixture
def store(tmp_path) -> tuple[str, str]:
    """A SQLite tracking store and a run in it: (uri, run id)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("flushing")
    return uri, client.create_run(experiment).info.run_id


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_points_wait_until_the_oldest_has_waited_flush_every_s(store, monkeypatch):
    uri, run_id = store
    clock = [100.0]
    monkeypatch.setattr(metric_buffer.time, "monotonic", lambda: clock[0])
    buffer = MetricBuffer(MlflowClient(uri), run_id, flush_every_s=10.0)
    buffer.add({"epoch": 1.0}, step=4)
    clock[0] += 6
    buffer.add({"epoch": 2.0}, step=8)
    assert buffer.flush_if_due() is False
    assert history(uri, run_id, "epoch") == []  # nothing sent yet
    clock[0] += 4  # the first point has now waited 10 s: both go, in one request
    assert buffer.flush_if_due() is True
    assert history(uri, run_id, "epoch") == [(4, 1.0), (8, 2.0)]
    buffer.add({"epoch": 3.0}, step=12)  # the clock of the wait starts again
    assert buffer.flush_if_due() is False
    buffer.close()  # the run's end sends the rest
    assert history(uri, run_id, "epoch") == [(4, 1.0), (8, 2.0), (12, 3.0)]


def test_flush_every_s_0_sends_each_call_at_once(store):
    uri, run_id = store
    buffer = MetricBuffer(MlflowClient(uri), run_id, flush_every_s=0.0)
    buffer.add({"epoch": 1.0, "bbox_mAP": 0.25}, step=4)
    assert buffer.flush_if_due() is True
    assert history(uri, run_id, "bbox_mAP") == [(4, 0.25)]


def test_waiting_points_round_trip_through_a_checkpoint_folder(store, tmp_path, caplog):
    uri, run_id = store
    buffer = MetricBuffer(MlflowClient(uri), run_id, flush_every_s=60.0)
    buffer.add({"train/loss": 1.5, "lr": 0.01}, step=3)
    buffer.save_pending(tmp_path)
    carried = read_pending(tmp_path, run_id)
    assert [(m.key, m.value, m.step, m.timestamp) for m in carried] == [
        (m.key, m.value, m.step, m.timestamp) for m in buffer.pending
    ]
    assert read_pending(tmp_path, "another-run") == []  # a checkpoint of another trial's run
    assert read_pending(tmp_path / "missing", run_id) == []  # written before this file existed
    (tmp_path / PENDING_FILE).write_text("{not json")
    assert read_pending(tmp_path, run_id) == []
    assert PENDING_FILE in caplog.text and "unreadable" in caplog.text


# ---- a worker killed while points wait ------------------------------------------------------


def loop_config(root: Path, work_dir: Path, uri: str, run_id: str, flush_every_s: float) -> dict:
    """A trial's ``loop_config``: test_engine's tiny detector, evaluated every epoch."""
    experiment = tiny_config(root, work_dir, epochs=EPOCHS, milestones=[EPOCHS])
    experiment = experiment.model_dump(mode="json")
    experiment["eval"]["every_epochs"] = 1
    experiment["device"] = "cpu"
    return {
        "experiment": experiment,
        "work_dir": str(work_dir),
        "ranking_metric": "bbox_mAP",
        "tracking_uri": uri,
        "run_id": run_id,
        "tracking_wait_s": 30.0,
        "metrics_flush_every_s": flush_every_s,
    }


def keeping_reporting(kept: Path, *, restore_from: Path | None = None, kill_after: int = 0):
    """A ``Reporting`` that copies each reported checkpoint into ``kept/epoch_N`` (as Ray
    copies it to storage), restores ``restore_from``, and SIGKILLs its own process right
    after the report of epoch ``kill_after``'s checkpoint (0: never)."""
    from ray.train import Checkpoint

    def report(metrics: dict, checkpoint=None) -> None:
        if checkpoint is None:
            return
        epoch = metrics["epoch"]
        shutil.copytree(checkpoint.path, kept / f"epoch_{epoch}")
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return Reporting(
        report=report,
        get_checkpoint=lambda: None if restore_from is None else Checkpoint(str(restore_from)),
        checkpoint_from_directory=Checkpoint.from_directory,
        rank=0,
    )


def _killed_worker(config: dict, kept: str, send_after_checkpoint: bool) -> None:
    """The first attempt: trains until its second epoch's checkpoint is reported, then dies.

    ``send_after_checkpoint``: the waiting points reach the server after the checkpoint was
    written and before the kill (as a flush falling in between would send them).
    """
    import torch

    torch.set_num_threads(1)
    reporting = keeping_reporting(Path(kept), kill_after=2)
    if send_after_checkpoint:
        inner = reporting.report

        def report(metrics: dict, checkpoint=None) -> None:
            if checkpoint is not None and metrics["epoch"] == 2:
                carried = read_pending(checkpoint.path, config["run_id"])
                MlflowClient(config["tracking_uri"]).log_batch(config["run_id"], carried)
            inner(metrics, checkpoint)

        reporting = Reporting(report, reporting.get_checkpoint,
                              reporting.checkpoint_from_directory, 0)  # fmt: skip
    train_loop(config, reporting)


@pytest.mark.parametrize("send_after_checkpoint", [False, True], ids=["waiting", "sent"])
def test_a_worker_killed_with_points_waiting_loses_none_and_logs_none_twice(
    store, tmp_path, send_after_checkpoint
):
    uri, run_id = store
    root = tmp_path / "coco"
    write_synthetic("coco", root, num_images={"train": 8, "val": 4}, num_classes=2,
                    image_size=96, seed=1)  # fmt: skip
    kept = tmp_path / "kept"
    kept.mkdir()
    config = loop_config(root, tmp_path / "work", uri, run_id, flush_every_s=3600.0)
    worker = multiprocessing.get_context("spawn").Process(
        target=_killed_worker, args=(config, str(kept), send_after_checkpoint)
    )
    worker.start()
    worker.join(timeout=600)
    assert worker.exitcode == -signal.SIGKILL
    # Nothing was due in the hour: the server holds what was sent by hand, if anything.
    sent = history(uri, run_id, "epoch")
    assert sent == ([(4, 1.0), (8, 2.0)] if send_after_checkpoint else [])
    carried = json.loads((kept / "epoch_2" / PENDING_FILE).read_text())["points"]
    assert sorted({step for _, _, _, step in carried}) == list(range(1, 9))

    restarted = keeping_reporting(kept, restore_from=kept / "epoch_2")
    assert train_loop(config, restarted) is None

    per_epoch = ITERS_PER_EPOCH
    assert [s for s, _ in history(uri, run_id, "train/loss")] == list(range(1, 3 * per_epoch + 1))
    assert [s for s, _ in history(uri, run_id, "lr")] == list(range(1, 3 * per_epoch + 1))
    assert history(uri, run_id, "epoch") == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert [s for s, _ in history(uri, run_id, "bbox_mAP")] == [4, 8, 12]
    # Epochs 1 and 2 came from the checkpoint, with the times they were measured at.
    client = MlflowClient(uri)
    first_two = [m for m in client.get_metric_history(run_id, "train/loss") if m.step <= 8]
    carried_times = {step: t for key, _, t, step in carried if key == "train/loss"}
    assert {m.step: m.timestamp for m in first_two} == carried_times


def test_under_early_stopping_an_evaluated_epoch_is_sent_before_it_is_reported(store):
    """ASHA may stop the trial on the report of an evaluated epoch, and Tune then ends its
    processes without a flush: such an epoch's points are sent at once, before the report;
    other epochs wait as usual."""
    from autoassign.engine import TrainState

    uri, run_id = store
    logger = MlflowTrialLogger(uri, run_id, log_every_iters=1, ranking_metric="bbox_mAP",
                               flush_every_s=3600.0, flush_evaluations=True)  # fmt: skip
    state = TrainState(max_epochs=2, iters_per_epoch=1)
    logger.on_train_start(state)
    state.iteration, state.epochs_completed = 1, 1
    state.epoch_losses = {"loss": 1.2}
    logger.on_step(state, {"loss": 1.2})
    logger.on_epoch_end(state, {})  # not evaluated: waits
    assert history(uri, run_id, "epoch") == []
    state.iteration, state.epochs_completed = 2, 2
    logger.on_step(state, {"loss": 1.0})
    logger.on_epoch_end(state, {"bbox_mAP": 0.3})  # evaluated: everything waiting goes
    assert history(uri, run_id, "epoch") == [(1, 1.0), (2, 2.0)]
    assert history(uri, run_id, "bbox_mAP") == [(2, 0.3)]
    assert [s for s, _ in history(uri, run_id, "train/loss")] == [1, 2]
