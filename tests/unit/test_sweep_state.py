"""A sweep's record: the lock on its output folder, the manifest in shared storage, a
``--resume`` that refuses to start over, and redaction. Real processes, a real S3 server
(moto's, on 127.0.0.1), no Ray: every case here is decided before Ray would start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.common.redaction import redact, redact_data
from orchestration.running.sweep_record import LOCK_FILE, SweepLock, SweepRecord
from tests.unit.test_sweep_config import GOOD, sweep_cli

REPO = Path(__file__).resolve().parents[2]
BUCKET = "state-bucket"


def hold_lock(folder: Path, sweep_id: str) -> subprocess.Popen:
    """A live process that holds the folder's lock, as a running sweep driver does."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from orchestration.running.sweep_record import SweepLock\n"
        f"lock = SweepLock(Path({str(folder)!r})); lock.acquire(); lock.record({sweep_id!r})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_sweep_on_a_live_sweeps_folder_is_refused_with_its_id_and_pid(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "t", "sweep_id": "t-live"}\n')
    holder = hold_lock(out, "t-20261203-live01")
    try:
        result = sweep_cli("good.yaml", cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert "is in use by sweep t-20261203-live01" in result.stderr
        assert f"pid {holder.pid}" in result.stderr
        # the live sweep's files are untouched, and no synthetic data was written
        assert json.loads((out / "manifest.json").read_text())["sweep_id"] == "t-live"
        assert not (tmp_path / "data").exists()
        resumed = sweep_cli("good.yaml", "--resume", cwd=tmp_path)
        assert resumed.returncode == 2 and "is in use by sweep" in resumed.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_driver_does_not_hold_the_lock(tmp_path):
    holder = hold_lock(tmp_path, "t-dead")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with SweepLock(tmp_path) as lock:
        lock.record("t-next")
        assert json.loads((tmp_path / LOCK_FILE).read_text())["sweep_id"] == "t-next"
    with SweepLock(tmp_path):  # released on exit: the same process takes it again
        pass


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.integration.conftest import free_port

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield {"endpoint": endpoint, "env": env}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def s3_config(tmp_path: Path, endpoint: str, storage: str | None = None) -> Path:
    data = yaml.safe_load(GOOD)
    data["storage"] = {"path": storage or f"s3://{BUCKET}/ray", "endpoint_url": endpoint}
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_manifest_is_kept_in_s3_and_resume_reads_it_when_the_local_one_is_gone(tmp_path, s3):
    from orchestration.running.storage import Storage

    shared = Storage(f"s3://{BUCKET}/ray", s3["endpoint"])
    record = SweepRecord("t", tmp_path / "out", shared)
    record.write_manifest(
        {"name": "t", "sweep_id": "t-on-s3", "status": "running", "storage_root": shared.root}
    )
    record.write_leaderboard([{"dataset": "coco", "status": "failed"}])
    assert json.loads(shared.read_text("sweeps/t/leaderboard.json"))[0]["dataset"] == "coco"
    for file in (tmp_path / "out").iterdir():  # the head's disk is lost
        file.unlink()
    assert record.read_manifest()["sweep_id"] == "t-on-s3"

    # The CLI finds it there too; Tune never saved state for it, so resume is refused
    # (instead of a fresh start under the same sweep id).
    config = s3_config(tmp_path, s3["endpoint"])
    result = sweep_cli(config, "--resume", cwd=tmp_path, env=s3["env"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "sweep t-on-s3 has no Ray Tune state under s3://state-bucket/ray/t-on-s3" in (
        result.stderr
    )
    assert not (tmp_path / "data").exists()


def test_resume_refuses_another_storage_than_the_one_the_sweep_ran_with(tmp_path, s3):
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"name": "t", "sweep_id": "t-s3", "status": "running", "updated": time.time()}
    manifest["storage_root"] = f"s3://{BUCKET}/ray"
    (out / "manifest.json").write_text(json.dumps(manifest))
    config = s3_config(tmp_path, s3["endpoint"], storage=str(tmp_path / "elsewhere"))
    result = sweep_cli(config, "--resume", cwd=tmp_path, env=s3["env"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"sweep t-s3 keeps its Ray state in s3://{BUCKET}/ray (storage_root of its manifest)"
        in result.stderr
    )
    assert f"resume with storage.path=s3://{BUCKET}/ray" in result.stderr

    # Without a storage.path of its own, the config takes the recorded one.
    manifest["storage_endpoint"] = s3["endpoint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "good.yaml").write_text(GOOD)
    result = sweep_cli("good.yaml", "--resume", cwd=tmp_path, env=s3["env"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"resuming with the storage the sweep ran with: s3://{BUCKET}/ray" in result.stdout
    assert f"no Ray Tune state under s3://{BUCKET}/ray/t-s3" in result.stderr


def test_a_finished_sweep_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(
        json.dumps({"name": "t", "sweep_id": "t-done", "status": "finished"})
    )
    (tmp_path / "good.yaml").write_text(GOOD)
    result = sweep_cli("good.yaml", "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "sweep t-done has already finished" in result.stderr


def test_redact_drops_credentials_and_query_strings():
    assert redact("postgresql://mlflow:pw123@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("https://mlflow.example/?token=abc123") == "https://mlflow.example/"
    assert redact("s3://bucket/key?X-Amz-Signature=f00") == "s3://bucket/key"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact("runs/demo") == "runs/demo"
    assert redact(None) is None


def test_redacted_config_keeps_servers_and_hides_secrets():
    from orchestration.running.parent_run import redacted_yaml

    data = {
        "tracking": {"uri": "http://alice:hunter2@mlflow:5000", "ui_url": None},
        "storage": {"path": "s3://b/ray", "endpoint_url": "http://minio:9000?key=k3y"},
        "extra": {"db_password": "p4ss", "items": ["https://u:t0k@h/x"]},
    }
    text = redacted_yaml(data)
    for secret in ("hunter2", "alice", "k3y", "p4ss", "t0k"):
        assert secret not in text
    shown = yaml.safe_load(text)
    assert shown["tracking"]["uri"] == "http://***@mlflow:5000"
    assert shown["storage"]["path"] == "s3://b/ray"
    assert redact_data({"token": None}) == {"token": None}


def test_the_logged_config_file_is_the_users_unless_it_holds_a_secret(tmp_path):
    from orchestration.running.parent_run import redacted_copy

    plain = tmp_path / "plain.yaml"
    plain.write_text("# my sweep\nname: t\n")
    assert redacted_copy(plain, tmp_path / "a").read_text() == "# my sweep\nname: t\n"
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: t\ntracking: {uri: 'http://bob:s3cr3t@host:5000'}\n")
    copy = redacted_copy(secret, tmp_path / "b")
    assert copy.name == "secret.yaml" and "s3cr3t" not in copy.read_text()
    assert "http://***@host:5000" in copy.read_text()
