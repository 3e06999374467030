"""Keys on the doors, for real on 127.0.0.1: Ray's Jobs API refuses a request without the
cluster's token, MLflow's basic-auth server one without credentials; the project's command
lines find the token themselves (no RAY_AUTH_MODE set by hand), and a sweep signs in with
MLflow's standard variables, its trials on the cluster too, without leaving the password in
anything it writes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.compose_mlflow import compose_mlflow_settings
from tests.integration.conftest import (
    CLUSTER_MLFLOW_USER,
    REPO,
    MlflowServer,
    SweepRunner,
    free_port,
    synthetic,
    tiny_sweep,
)

pytestmark = pytest.mark.integration

ADMIN, PASSWORD = "admin", "it-mlflow-password-7c1e0a"


@pytest.fixture(scope="module")
def signed_in_mlflow(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` with the compose stack's auth settings
    (deploy/mlflow_basic_auth.ini, its user store moved to this folder) and its serving
    settings (``compose_mlflow_settings``)."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
    ini = folder / "basic_auth.ini"
    text = (REPO / "deploy" / "mlflow_basic_auth.ini").read_text()
    assert "sqlite:////auth/" in text
    ini.write_text(text.replace("sqlite:////auth/", f"sqlite:///{folder}/"))
    env = {
        **os.environ,
        **compose_mlflow_settings(),
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "it-flask-secret",
    }
    server = MlflowServer(
        free_port(),
        f"sqlite:///{folder / 'mlflow.db'}",
        str(folder / "artifacts"),
        env,
        folder / "server.log",
        app_name="basic-auth",
    )
    server.start()
    # The user the cluster's nodes sign in as (conftest's CLUSTER_MLFLOW_USER), with MLflow's
    # default permission only: it reads every experiment and writes to its own.
    user, password = CLUSTER_MLFLOW_USER
    created = urllib.request.Request(
        f"{server.uri}/api/2.0/mlflow/users/create",
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={**basic(ADMIN, PASSWORD), "Content-Type": "application/json"},
    )
    urllib.request.urlopen(created, timeout=30).close()
    yield server
    server.stop()


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_requests_without_the_keys_are_refused(signed_in_mlflow, ray_cluster):
    search = f"{signed_in_mlflow.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status_of(search) == 401
    assert status_of(search, basic(ADMIN, "wrong")) == 401
    assert status_of(search, basic(ADMIN, PASSWORD)) == 200
    assert status_of(f"{signed_in_mlflow.uri}/health") == 200  # what healthchecks ask

    jobs = f"{ray_cluster.dashboard_url}/api/jobs/"
    token = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert status_of(jobs) == 401
    assert status_of(jobs, {"Authorization": "Bearer not-the-token"}) in (401, 403)
    assert status_of(jobs, {"Authorization": f"Bearer {token}"}) == 200
    assert status_of(f"{ray_cluster.dashboard_url}/api/gcs_healthz") == 200  # compose's check


def jobs_cli(
    ray_cluster, *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestration.jobs", *args, "--address",
         ray_cluster.dashboard_url],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def jobs_list(ray_cluster, env: dict[str, str]) -> subprocess.CompletedProcess:
    return jobs_cli(ray_cluster, "list", env=env)


def test_the_jobs_cli_finds_the_token_without_ray_auth_mode(ray_cluster, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.pop("RAY_ADDRESS", None)
    token_file = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"])

    named = jobs_list(ray_cluster, {**base, "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert named.returncode == 0, named.stderr

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    shutil.copy(token_file, home / ".ray" / "auth_token")  # Ray's default place
    default = jobs_list(ray_cluster, {**base, "HOME": str(home)})
    assert default.returncode == 0, default.stderr

    empty = tmp_path / "nobody"
    empty.mkdir()
    refused = jobs_list(ray_cluster, {**base, "HOME": str(empty)})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "wants its auth token" in refused.stderr


def test_a_sweep_signs_in_with_mlflows_variables_and_keeps_every_secret_out(
    sweep_runner, signed_in_mlflow, s3_server, tmp_path
):
    folder = sweep_runner.folder
    name = "it-signed-in"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=signed_in_mlflow.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("signed-shapes", "coco", folder, images=4)],
        epochs=1,
    )
    credentials = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    # The cluster's nodes sign in as a user who may only read this experiment: the trials
    # log to it because they get the driver's credentials.
    runner = SweepRunner(folder, {**sweep_runner.env, **credentials})
    code, log = runner.run(runner.write(name, config))
    assert code == 0, log[-4000:]

    from mlflow.tracking import MlflowClient

    os.environ.update(credentials)
    try:
        client = MlflowClient(signed_in_mlflow.uri)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id])
    finally:
        for key in credentials:
            os.environ.pop(key)
    trials = [r for r in runs if "autoassign.dataset" in r.data.tags]
    assert len(runs) == 2 and len(trials) == 1
    assert trials[0].info.status == "FINISHED" and "bbox_mAP" in trials[0].data.metrics
    # No secret of the sweep's environment is in anything it wrote or logged: the MLflow
    # password, the S3 secret key, the Ray token; params, tags, log files, the manifest, the
    # leaderboard, and the runs' text artifacts (the resolved config among them).
    secrets = {
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "AWS_SECRET_ACCESS_KEY": s3_server.env["AWS_SECRET_ACCESS_KEY"],
        "the Ray token": Path(runner.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
    }
    written = {"terminal": log, "sweep.log": (folder / name / "sweep.log").read_text()}
    written |= {p.name: p.read_text() for p in (folder / name).glob("*.json")}
    assert {"manifest.json", "leaderboard.json"} <= set(written)
    os.environ.update(credentials)
    try:
        for run in runs:
            written[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
            local = Path(
                client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
            )
            for file in local.rglob("*"):
                if file.is_file() and file.suffix in {".yaml", ".json", ".txt", ".md", ".log"}:
                    written[f"artifact {file.relative_to(local)}"] = file.read_text()
    finally:
        for key in credentials:
            os.environ.pop(key)
    assert any("sweep_resolved" in where for where in written), sorted(written)
    for what, secret in secrets.items():
        leaked = [where for where, text in written.items() if secret in text]
        assert not leaked, f"{what} is in {leaked}"


def test_a_sweep_job_signs_in_with_the_clusters_credentials(
    sweep_runner, signed_in_mlflow, s3_server, ray_cluster, tmp_path
):
    """A sweep submitted as a Ray Job, by a user whose environment holds only the Ray token,
    runs end to end against the signed-in server: its driver and trials sign in with the
    credentials the cluster's nodes were started with, as in the compose stack."""
    name = "it-signed-in-job"
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("autoassign", "orchestration", "configs"):
        shutil.copytree(REPO / folder, project / folder, ignore=ignore)
    config = tiny_sweep(
        name,
        sweep_runner.folder,
        mlflow_uri=signed_in_mlflow.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("signed-job-shapes", "coco", sweep_runner.folder, images=4)],
        epochs=1,
    )
    (project / "configs" / "signed_in_job.yaml").write_text(yaml.safe_dump(config))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))},
        **ray_cluster.env,
    }
    submitted = jobs_cli(
        ray_cluster, "submit", str(project / "configs" / "signed_in_job.yaml"),
        "--working-dir", str(project), env=env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    followed = jobs_cli(ray_cluster, "logs", job_id, "--follow", env=env, timeout=600)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    assert "leaderboard (best trial per dataset)" in followed.stdout
    status = jobs_cli(ray_cluster, "status", job_id, env=env)
    assert f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr

    from mlflow.tracking import MlflowClient

    credentials = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    os.environ.update(credentials)
    try:
        client = MlflowClient(signed_in_mlflow.uri)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id])
    finally:
        for key in credentials:
            os.environ.pop(key)
    kinds = sorted(run.data.tags.get("autoassign.kind") for run in runs)
    assert kinds == ["sweep", "trial"]
    assert all(run.info.status == "FINISHED" for run in runs)
    (trial,) = [run for run in runs if run.data.tags.get("autoassign.kind") == "trial"]
    assert "bbox_mAP" in trial.data.metrics
    # The job's entrypoint, its logs and its status hold neither password.
    shown = followed.stdout + followed.stderr + status.stdout + submitted.stdout
    for secret in (CLUSTER_MLFLOW_USER[1], PASSWORD):
        assert secret not in shown
