"""The services restarting under a sweep, for real: the PostgreSQL behind ``mlflow server``
restarted mid-trial, and the S3 server down for 30 s while the trial checkpoints."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from tests.integration.conftest import BUCKET, synthetic, tiny_sweep
from tests.integration.test_fault_tolerance import (
    SNAPSHOT,
    assert_each_step_once,
    epochs_logged,
    trial_runs,
    wait_until,
)

pytestmark = pytest.mark.integration


def last_step(client, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)


def start_three_epochs(sweep_runner, mlflow_server, s3_server, name: str, **overrides):
    folder = sweep_runner.folder
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic(f"{name}-shapes", "coco", folder, images=24, classes=2)],
        epochs=3,
    )
    config["resources"].update(overrides)
    path = sweep_runner.write(name, config)
    return path, sweep_runner.start(path)


def first_epoch_run(client, name: str):
    return next((r for r in trial_runs(client, name) if epochs_logged(client, r.info.run_id)), None)


def assert_finished_with_every_step_once(client, run_id: str) -> None:
    assert client.get_run(run_id).info.status == "FINISHED"
    epochs = epochs_logged(client, run_id)
    assert [v for _, v in epochs] == [1, 2, 3]  # every epoch arrived, once
    assert_each_step_once(client, run_id, "train/loss", list(range(1, epochs[-1][0] + 1)))


def test_a_postgresql_restart_mid_trial_loses_no_metric(
    sweep_runner, mlflow_server, s3_server, postgres
):
    if postgres is None:
        pytest.skip("no PostgreSQL behind the tracking server")
    name = "it-pg-restart"
    path, process = start_three_epochs(sweep_runner, mlflow_server, s3_server, name)
    client = mlflow_server.client()
    try:
        run = wait_until(lambda: first_epoch_run(client, name), timeout=300, what="epoch 1")
        before = last_step(client, run.info.run_id)
        started = time.monotonic()
        postgres.restart()
        restarted = time.monotonic()
        wait_until(
            lambda: last_step(client, run.info.run_id) > before,
            timeout=300,
            every=0.2,
            what="a new step after the restart",
        )
        flowing = time.monotonic()
        code = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    log = path.with_suffix(".log").read_text()
    print(
        f"PostgreSQL restart took {restarted - started:.1f} s; the trial's metrics reached "
        f"the store again {flowing - restarted:.1f} s after it"
    )
    assert code == 0, log[-4000:]
    assert_finished_with_every_step_once(client, run.info.run_id)
    others = client.search_runs([run.info.experiment_id])
    assert sorted(r.info.status for r in others) == ["FINISHED", "FINISHED"]  # parent, trial


def registered_checkpoint_files(s3_server, sweep: str) -> dict[str, bytes]:
    """``checkpoint_dir_name -> checkpoint.pt bytes`` of every checkpoint Ray Train registered
    for the sweep's one trial (its controller's snapshot), read back from S3."""
    keys = [k for k in s3_server.keys(f"ray/{sweep}-") if k.endswith(SNAPSHOT)]
    assert len(keys) == 1, keys
    trial_folder = keys[0].removesuffix(SNAPSHOT)
    s3 = s3_server.client()
    snapshot = json.loads(s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())
    files = {}
    for result in snapshot["checkpoint_results"]:
        name = result["checkpoint_dir_name"]
        key = f"{trial_folder}/{name}/checkpoint.pt"
        files[name] = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return files


def test_an_s3_outage_while_checkpointing_registers_no_partial_checkpoint(
    sweep_runner, mlflow_server, s3_server
):
    """S3 down for 30 s from the end of the first epoch, when the trial uploads its
    checkpoint; with room for restarts (``max_failures``) the trial retries, continues and
    finishes into its one run, and every checkpoint Ray registered is whole."""
    name = "it-s3-outage"
    path, process = start_three_epochs(
        sweep_runner, mlflow_server, s3_server, name, max_failures=10
    )
    client = mlflow_server.client()
    try:
        run = wait_until(lambda: first_epoch_run(client, name), timeout=300, what="epoch 1")
        s3_server.stop()
        time.sleep(30)
        s3_server.start()
        back = time.monotonic()
        code = process.wait(timeout=900)
        ended = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
    log = path.with_suffix(".log").read_text()
    print(f"after S3 came back the sweep needed {ended - back:.1f} s more")
    assert code == 0, log[-4000:]
    assert_finished_with_every_step_once(client, run.info.run_id)
    assert len(trial_runs(client, name)) == 1
    files = registered_checkpoint_files(s3_server, name)
    assert files
    for name_, data in files.items():
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        assert "model" in state and "config" in state, name_
