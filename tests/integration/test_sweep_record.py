"""The sweep's record when finishing fails for real, and secrets in a tracking URI.

One one-trial sweep, whose tracking URI carries a user and password (the test server has no
authentication and ignores them), cannot write its ``leaderboard.json`` (a folder stands in
its place): the trials are done, so the parent run must end FAILED, the manifest must not
say ``finished``, and the command must say what failed without a traceback. Then the head's
disk is "lost" (the whole output folder removed): ``--resume`` reads the manifest from S3 and
finishes the record without rerunning the trial. Nothing the sweep printed, logged or stored
holds the password.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.integration.conftest import BUCKET, synthetic, tiny_sweep
from tests.integration.test_fault_tolerance import epochs_logged, trial_runs

pytestmark = pytest.mark.integration

PASSWORD = "pw-never-shown-7f3a"


def test_a_failed_finish_is_recorded_and_resume_from_s3_completes_it(
    sweep_runner, mlflow_server, s3_server
):
    folder = sweep_runner.folder
    name = "it-record"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri.replace("http://", f"http://alice:{PASSWORD}@"),
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("record-shapes", "coco", folder, images=4)],
        epochs=1,
    )
    path = sweep_runner.write(name, config)
    output = folder / name
    (output / "leaderboard.json").mkdir(parents=True)  # a write there fails for real

    code, log = sweep_runner.run(path)
    assert code == 1, log[-4000:]
    assert f"sweep {name}-" in log and "failed: IsADirectoryError" in log
    assert "--resume" in log.split("failed: IsADirectoryError")[-1]
    assert "Traceback" not in log.split("failed: IsADirectoryError")[-1]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "IsADirectoryError" in manifest["error"]
    client = mlflow_server.client()
    experiment_id = client.get_experiment_by_name(name).experiment_id
    parent = client.get_run(manifest["parent_run_id"])
    assert parent.info.status == "FAILED"
    (trial,) = trial_runs(client, name)
    assert trial.info.status == "FINISHED"

    shutil.rmtree(output)  # the head node's disk is gone; the S3 copy is what is left
    code, log = sweep_runner.run(path, "--resume")
    assert code == 0, log[-4000:]
    finished = client.get_run(manifest["parent_run_id"])
    assert finished.info.status == "FINISHED"
    assert "autoassign.failure_reason" not in finished.data.tags  # the failure is over
    (same,) = trial_runs(client, name)
    assert same.info.run_id == trial.info.run_id
    assert [v for _, v in epochs_logged(client, trial.info.run_id)] == [1]  # not rerun
    resumed = json.loads((output / "manifest.json").read_text())
    assert resumed["status"] == "finished" and resumed["sweep_id"] == manifest["sweep_id"]
    assert json.loads((output / "leaderboard.json").read_text())[0]["status"] == "ok"
    on_s3 = s3_server.client().get_object(Bucket=BUCKET, Key=f"ray/sweeps/{name}/manifest.json")[
        "Body"
    ]
    assert json.loads(on_s3.read())["status"] == "finished"

    # No secret anywhere: printed lines, the local record, params, tags, artifacts.
    shown = [log, (folder / f"{name}.log").read_text()]
    shown += [p.read_text(errors="replace") for p in output.rglob("*") if _is_text(p)]
    for run in client.search_runs([experiment_id], max_results=100):
        shown += [*map(str, run.data.params.values()), *map(str, run.data.tags.values())]
    s3 = s3_server.client()
    for key in s3_server.keys("mlflow/") + s3_server.keys(f"ray/sweeps/{name}/"):
        if key.endswith((".yaml", ".json", ".md", ".txt", ".yml", "MLmodel")):
            shown.append(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode())
    leaks = [text[max(0, text.find(PASSWORD) - 200) :][:400] for text in shown if PASSWORD in text]
    assert not leaks, leaks


def _is_text(path) -> bool:
    return path.is_file() and path.suffix in (".json", ".yaml", ".md", ".log", ".txt")
