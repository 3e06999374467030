"""Failures caused for real while a sweep runs: a SIGKILLed Ray Train worker, a SIGKILLed
Tune trial driver, a SIGKILLed trial process that trains itself (``resources.runner: trial``),
a SIGKILLed sweep driver (then ``--resume``), and the MLflow server down
for 30 s; then the MLflow server stopped under the sweep driver's run closing and under a
trial's start.

Each sweep test polls the MLflow server to know where the trial is, then does the damage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.integration.conftest import BUCKET, synthetic, tiny_sweep

pytestmark = pytest.mark.integration

SNAPSHOT = "/checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints


def wait_until(predicate, *, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def trial_runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("autoassign.kind") == "trial"]


def epochs_logged(client, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "epoch")]


def pids_of(process_title: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", process_title], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def train_worker_pids() -> list[int]:
    return pids_of("ray::RayTrainWorker")


def trial_driver_pids() -> list[int]:
    """Tune runs a function trainable (our trial driver) in an ``ImplicitFunc`` actor: its
    process is titled ``ray::ImplicitFunc.train`` while the trial runs."""
    return pids_of("ray::ImplicitFunc")


def registered_checkpoints(s3_server, sweep: str) -> int:
    """How many checkpoints Ray Train's controller has registered for the sweep's one trial.

    A worker's report reaches the controller on its next poll (every 2 s); a worker killed
    in between loses that checkpoint, so a test that wants a restore waits for this file.
    """
    keys = [k for k in s3_server.keys(f"ray/{sweep}-") if k.endswith(SNAPSHOT)]
    if not keys:
        return 0
    body = s3_server.client().get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    return len(json.loads(body).get("checkpoint_results", []))


def assert_each_step_once(client, run_id: str, key: str, expected: list[int]) -> None:
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert sorted(steps) == expected, f"{key}: {steps}"


def tune_checkpoints(s3_server, sweep: str) -> list[str]:
    """The checkpoint folders Tune persisted for the sweep's trials that train in their own
    process (``ray/<sweep id>/<trial id>/checkpoint_NNNNNN/``; Ray Train's are under
    ``train/``)."""
    keys = s3_server.keys(f"ray/{sweep}-")
    return sorted({k.rsplit("/", 1)[0] for k in keys if "/checkpoint_" in k and "/train/" not in k})


def past_the_first_checkpoint(client, s3_server, sweep: str, checkpointed=registered_checkpoints):
    """The trial run that is into its second epoch, with its first epoch's checkpoint
    stored (``checkpointed``: Ray Train's registered ones by default), or None."""
    for r in trial_runs(client, sweep):
        epochs = epochs_logged(client, r.info.run_id)
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        past_first_checkpoint = epochs and max(steps) >= epochs[0][0] + 2
        if past_first_checkpoint and checkpointed(s3_server, sweep):
            return r
    return None


def assert_three_epochs_once_from_a_restore(client, run_id: str, log: str) -> None:
    """Epochs 1..3 and every step logged once, and the last start of the trial's training
    restored a checkpoint (it did not start from iteration 0); ``log``: the sweep's log file,
    where its workers' output goes."""
    epochs = epochs_logged(client, run_id)
    assert [value for _, value in epochs] == [1, 2, 3]  # each epoch logged once
    per_epoch = epochs[0][0]
    assert [step for step, _ in epochs] == [per_epoch * e for e in range(1, 4)]
    assert_each_step_once(client, run_id, "train/loss", list(range(1, 3 * per_epoch + 1)))
    assert_each_step_once(client, run_id, "bbox_mAP", [s for s, _ in epochs])
    starts = [line for line in log.splitlines() if "starting at iteration" in line]
    assert len(starts) >= 2 and not starts[-1].rstrip().endswith("starting at iteration 0")


def kill_after_the_first_checkpoint(
    sweep_runner, mlflow_server, s3_server, name, victims, runner="ray_train"
):
    """Run a one-trial, three-epoch sweep (``resources.runner``: ``runner``) and SIGKILL
    ``victims()`` (pids, at least one) mid-epoch, once Ray registered the first epoch's
    checkpoint; wait for the sweep to end.

    Returns the sweep's exit status and log, the MLflow client and the trial's run.
    """
    folder = sweep_runner.folder
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic(f"{name}-shapes", "coco", folder, images=16, classes=2)],
        epochs=3,
    )
    config["resources"]["runner"] = runner
    checkpointed = tune_checkpoints if runner == "trial" else registered_checkpoints
    path = sweep_runner.write(name, config)
    process = sweep_runner.start(path)
    client = mlflow_server.client()
    terminal = path.with_suffix(".log")

    def first_epoch_shown_and_checkpointed():
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended before the kill:\n{terminal.read_text()}")
        # The sweep's own epoch-1 line must have come out: the report travels worker ->
        # trial driver -> Tune driver, and killing the trial driver before it arrives
        # would (rightly) leave no epoch-1 line to assert on.
        shown = re.search(r"^\S+  epoch 1/3  ", terminal.read_text(), re.M)
        return shown and past_the_first_checkpoint(client, s3_server, name, checkpointed)

    try:
        run = wait_until(first_epoch_shown_and_checkpointed, timeout=300, what="the second epoch")
        for pid in victims():
            os.kill(pid, signal.SIGKILL)
        code = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    return code, path.with_suffix(".log").read_text(), client, run


def assert_one_finished_run_restored(client, name, run, code, log, folder):
    assert code == 0, log[-4000:]
    # The terminal says so in words, once per epoch.
    assert re.search(r"^\S+  continued from its checkpoint of epoch [12] ", log, re.M), log
    assert sorted(re.findall(r"^\S+  epoch (\d)/3  ", log, re.M)) == ["1", "2", "3"], log
    runs = trial_runs(client, name)
    assert len(runs) == 1 and runs[0].info.run_id == run.info.run_id
    assert runs[0].info.status == "FINISHED"
    assert "autoassign.failure_reason" not in runs[0].data.tags
    # The replacement restored a checkpoint and logged nothing twice.
    worker_log = (folder / name / "sweep.log").read_text()
    assert_three_epochs_once_from_a_restore(client, run.info.run_id, worker_log)


def test_killed_worker_is_replaced_and_continues_into_the_same_run(
    sweep_runner, mlflow_server, s3_server
):
    def workers():
        pids = train_worker_pids()
        assert pids, "no Ray Train worker process found"
        return pids

    name = "it-worker-kill"
    code, log, client, run = kill_after_the_first_checkpoint(
        sweep_runner, mlflow_server, s3_server, name, workers
    )
    assert_one_finished_run_restored(client, name, run, code, log, sweep_runner.folder)


def test_killed_trial_driver_is_started_again_by_tune_into_the_same_run(
    sweep_runner, mlflow_server, s3_server
):
    """The trial driver (and so Ray Train's controller beside it, and its workers) gone, as
    when its node is lost: Tune starts the trial again, without --resume, and the new
    driver's TorchTrainer restores the last checkpoint Train registered."""

    def the_driver():
        drivers = trial_driver_pids()
        assert len(drivers) == 1, f"trial driver processes: {drivers}"
        return drivers

    name = "it-trial-driver-kill"
    code, log, client, run = kill_after_the_first_checkpoint(
        sweep_runner, mlflow_server, s3_server, name, the_driver
    )
    assert_one_finished_run_restored(client, name, run, code, log, sweep_runner.folder)


def test_a_trial_training_in_its_own_process_is_started_again_from_its_checkpoint(
    sweep_runner, mlflow_server, s3_server
):
    """``resources.runner: trial``: the trial's Tune process is its one worker (no Ray Train
    controller or worker group). SIGKILLed after its first checkpoint, Tune starts the trial
    again from the checkpoint it registered, into the same MLflow run, whose checkpoint tag
    then names a checkpoint Tune kept on S3."""
    seen_train_workers: list[int] = []

    def the_trial_process():
        seen_train_workers.extend(train_worker_pids() + pids_of("ray::TrainController"))
        processes = trial_driver_pids()
        assert len(processes) == 1, f"trial processes: {processes}"
        return processes

    name = "it-trial-process-kill"
    code, log, client, run = kill_after_the_first_checkpoint(
        sweep_runner, mlflow_server, s3_server, name, the_trial_process, runner="trial"
    )
    assert seen_train_workers == []
    assert_one_finished_run_restored(client, name, run, code, log, sweep_runner.folder)
    uri = client.get_run(run.info.run_id).data.tags["autoassign.checkpoint_uri"]
    kept = tune_checkpoints(s3_server, name)
    assert uri in [f"s3://{BUCKET}/{folder}" for folder in kept], (uri, kept)
    assert uri.endswith("/checkpoint_000002")  # the last epoch's, after the restart
    board = json.loads((sweep_runner.folder / name / "leaderboard.json").read_text())
    assert board[0]["checkpoint"] == uri


def test_resume_after_the_driver_was_killed(sweep_runner, mlflow_server, s3_server):
    folder = sweep_runner.folder
    name = "it-driver-kill"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("resume-shapes", "coco", folder, images=8, classes=2)],
        epochs=3,
        # TPE, so the resume also restores the searcher (the grid path is test_sweep's).
        search_space={"model.center_prior.sigma_init": {"uniform": [1.0, 1.5]}},
        search={"algorithm": "tpe", "num_samples": 2, "max_concurrent_trials": 1},
    )
    path = sweep_runner.write(name, config)
    process = sweep_runner.start(path)
    client = mlflow_server.client()

    def first_done_second_started():
        runs = trial_runs(client, name)
        done = [r for r in runs if r.info.status == "FINISHED"]
        going = [r for r in runs if r.info.status == "RUNNING"]
        if done and going and epochs_logged(client, going[0].info.run_id):
            return done[0], going[0]
        return None

    try:
        finished, interrupted = wait_until(
            first_done_second_started, timeout=400, what="one finished and one started trial"
        )
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    manifest = json.loads((folder / name / "manifest.json").read_text())
    assert manifest["status"] == "running"  # the driver never got to close anything
    finished_history = epochs_logged(client, finished.info.run_id)

    code, log = sweep_runner.run(path, "--resume")
    assert code == 0, log[-4000:]
    runs = trial_runs(client, name)
    assert sorted(r.info.run_id for r in runs) == sorted(
        [finished.info.run_id, interrupted.info.run_id]
    ), "a resumed sweep opened new runs"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert epochs_logged(client, finished.info.run_id) == finished_history  # not rerun
    assert [v for _, v in epochs_logged(client, interrupted.info.run_id)] == [1, 2, 3]
    manifest = json.loads((folder / name / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    parents = [
        r
        for r in client.search_runs(
            [client.get_experiment_by_name(name).experiment_id], max_results=100
        )
        if r.data.tags.get("autoassign.kind") == "sweep"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_mlflow_outage_of_30_seconds_loses_nothing(sweep_runner, mlflow_server, s3_server):
    folder = sweep_runner.folder
    name = "it-outage"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("outage-shapes", "coco", folder, images=32, classes=2)],
        epochs=3,
    )
    path = sweep_runner.write(name, config)
    process = sweep_runner.start(path)
    client = mlflow_server.client()
    try:
        run = wait_until(
            lambda: next(
                (r for r in trial_runs(client, name) if epochs_logged(client, r.info.run_id)), None
            ),
            timeout=300,
            what="the first epoch of the trial",
        )
        mlflow_server.stop()
        time.sleep(30)
        still_training = process.poll() is None
        mlflow_server.start()
        code = process.wait(timeout=600)
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()
        if process.poll() is None:
            process.kill()
    log = path.with_suffix(".log").read_text()
    # Training may end during the outage; the trial then waits to flush what it buffered.
    assert still_training, "the sweep ended while its tracking server was down"
    assert code == 0, log[-4000:]
    run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    epochs = epochs_logged(client, run_id)
    assert [v for _, v in epochs] == [1, 2, 3]  # every epoch arrived, once
    assert_each_step_once(client, run_id, "train/loss", list(range(1, epochs[-1][0] + 1)))
    assert "MLflow unreachable" in log


def stub_trial():
    """A Ray Tune ``Trial`` as the sweep driver's callbacks receive it (no actor behind it)."""
    from ray.tune.experiment import Trial

    return Trial("run_trial", config={"dataset": "coco"}, stub=True)


def test_run_closing_waits_out_a_stopped_tracking_server(mlflow_server):
    """The sweep driver's callback against a server that is down: it must not raise (Tune
    would error the trial, then stop the sweep), and it closes the runs once it is back."""
    from orchestration.tracking.run_closing import RunCloser
    from orchestration.tracking.tags import TAG_EARLY_STOPPED, TAG_SWEEP_ID, TAG_TRIAL_ID
    from orchestration.tracking.tracker import Tracker

    sweep_id = "it-closing-1"
    tracker = Tracker(mlflow_server.uri, "it-closing")
    closer = RunCloser(tracker, sweep_id)
    stopped, errored = stub_trial(), stub_trial()
    run_ids = {}
    for trial in (stopped, errored):
        tags = {TAG_SWEEP_ID: sweep_id, TAG_TRIAL_ID: trial.trial_id}
        run = tracker.client.create_run(tracker.experiment_id, tags=tags)
        run_ids[trial.trial_id] = run.info.run_id
    mlflow_server.stop()
    try:
        closer.on_trial_complete(0, [], stopped)  # early-stopped by the scheduler
        closer.on_trial_error(0, [], errored)  # its driver died
        closer.on_step_end(1, [])
        assert set(closer.pending) == {stopped.trial_id, errored.trial_id}
    finally:
        mlflow_server.start()
    closer.on_experiment_end([])
    assert not closer.pending
    client = mlflow_server.client()
    run = client.get_run(run_ids[stopped.trial_id])
    assert run.info.status == "KILLED" and run.data.tags[TAG_EARLY_STOPPED] == "true"
    assert client.get_run(run_ids[errored.trial_id]).info.status == "FAILED"


def test_a_trial_start_waits_out_a_tracking_outage(mlflow_server, sweep_runner, monkeypatch):
    """A trial launched while the tracking server is down waits for it, as long as the
    sweep's tracking wait (the bound of the metric buffer's final flush too), and opens its
    run once the server is back; with a wait shorter than the outage it gives up."""
    from mlflow.exceptions import MlflowException

    from orchestration.definition.sweep_config import SweepConfig
    from orchestration.definition.trial_experiments import trial_experiment
    from orchestration.running.trial import SweepContext, open_trial_run

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)  # the trial driver's settings, undone after
    folder = sweep_runner.folder
    sweep = SweepConfig.model_validate(
        tiny_sweep(
            "it-start-wait",
            folder,
            mlflow_uri=mlflow_server.uri,
            s3_endpoint="http://unused",
            datasets=[synthetic("start-shapes", "coco", folder, classes=2)],
        )
    )
    dataset = sweep.datasets[0]

    def start(wait: float):
        context = SweepContext(
            sweep=sweep.model_dump(mode="json"),
            sweep_id="it-start-wait-1",
            parent_run_id=None,
            tracking_uri=mlflow_server.uri,
            storage_root="unused",
            storage_endpoint=None,
            work_dir=str(folder),
            tracking_wait_s=wait,
        )
        experiment = trial_experiment(sweep, dataset, {}, output_dir=folder / "start-wait")
        return open_trial_run(
            context, sweep, trial_id="t1", dataset=dataset, params={}, experiment=experiment
        )

    mlflow_server.stop()
    comeback = threading.Timer(5.0, mlflow_server.start)
    try:
        with pytest.raises(MlflowException):
            start(wait=2.0)
        comeback.start()  # the server answers again about 20 s from now (5 s + its start)
        tracker, run_id = start(wait=240.0)
    finally:
        if comeback.ident is not None:
            comeback.join()
        if mlflow_server.process is None:
            mlflow_server.start()
    tracker.run_details_logged(run_id)  # the params follow the run in the background
    run = mlflow_server.client().get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["autoassign.trial_id"] == "t1"
    assert run.data.params["dataset"] == "start-shapes"
    tracker.end_run(run_id, "FINISHED")
