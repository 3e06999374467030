"""What a sweep job uploads, and what the jobs CLI says about a refusal, without a cluster:
the package is built with Ray's own packaging code, the way ``JobSubmissionClient`` builds it
for a ``working_dir``. Submitting to a real Ray head is in
tests/integration/test_cluster_jobs.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from autoassign.errors import ConfigError
from orchestration.cluster.ray_jobs import (
    WORKING_DIR_EXCLUDES,
    SweepJob,
    upload_limit,
    upload_sizes,
)
from orchestration.common.error_text import ray_error_reason

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2

# Ray 2.60's answer to a second job with submission id dup-1, as the Jobs API sent it to
# JobSubmissionClient (tests/integration/test_cluster_jobs.py causes it for real).
DUPLICATE_ID_ERROR = (
    "Request failed with status code 500: Traceback (most recent call last):\n"
    '  File ".../ray/dashboard/modules/job/job_head.py", line 419, in submit_job\n'
    "    resp = await job_agent_client.submit_job_internal(submit_request)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File ".../ray/dashboard/modules/job/job_head.py", line 134, in _raise_error\n'
    '    raise RuntimeError(f"Request failed with status code {status}: {error_text}.")\n'
    "RuntimeError: Request failed with status code 400: Traceback (most recent call last):\n"
    '  File ".../ray/dashboard/modules/job/job_manager.py", line 553, in submit_job\n'
    "    raise ValueError(\n"
    "ValueError: Job with submission_id dup-1 already exists. Please use a different "
    "submission_id.\n.\n."
)


def project_copy(root: Path) -> Path:
    """The project's code as a user's folder holds it, with the local state a job must not
    upload: datasets, runs, virtualenvs, credentials, a git folder and byte code."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("autoassign", "orchestration", "configs"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    for local in ("data/coco/x.json", "runs/demo/manifest.json", ".venv/bin/python",
                  "venv/bin/python", ".git/HEAD", "autoassign/__pycache__/config.pyc"):  # fmt: skip
        (root / local).parent.mkdir(parents=True, exist_ok=True)
        (root / local).write_text("local state\n")
    for secret in (".env", ".env.local", ".env.example", "configs/.env"):
        (root / secret).write_text("POSTGRES_PASSWORD=hunter2\n")
    return root


def ray_package(folder: Path, target: Path) -> set[str]:
    """The names in the zip Ray builds from ``folder`` for a job's working_dir."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(folder), target, include_gitignore=True, excludes=WORKING_DIR_EXCLUDES)
    with zipfile.ZipFile(target) as package:
        return set(package.namelist())


def test_the_package_holds_every_module_and_no_local_state(tmp_path):
    project = project_copy(tmp_path / "project")
    names = ray_package(project, tmp_path / "package.zip")
    assert "autoassign/data/errors.py" in names  # a package named like the data folder
    modules = [
        path.relative_to(project).as_posix()
        for folder in ("autoassign", "orchestration")
        for path in (project / folder).rglob("*.py")
    ]
    assert len(modules) > 50
    assert not set(modules) - names, sorted(set(modules) - names)
    assert "configs/multi_dataset.yaml" in names
    for prefix in ("data/", "runs/", ".venv/", "venv/", ".git/"):
        assert not [name for name in names if name.startswith(prefix)], prefix
    assert not [name for name in names if "__pycache__" in name]
    assert not {".env", ".env.local", ".env.example", "configs/.env"} & names


def test_the_size_estimate_matches_the_package_ray_builds(tmp_path):
    project = project_copy(tmp_path / "project")
    (project / "configs" / "blob.bin").write_bytes(os.urandom(3 * MIB))
    (project / "empty").mkdir()  # Ray packs an empty folder as an entry of its own
    estimate = sum(upload_sizes(project).values())
    ray_package(project, tmp_path / "package.zip")
    actual = (tmp_path / "package.zip").stat().st_size
    # Never below what Ray sends; above it by a few bytes a file at most.
    assert actual <= estimate <= actual + 8 * len(list(project.rglob("*")))
    assert set(upload_sizes(project)) == {"autoassign", "orchestration", "configs", "empty"}


def jobs_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "orchestration.jobs", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def tiny_config(folder: Path, **base) -> Path:
    config = {
        "name": "tiny",
        "base": {"model": {"backbone": {"depth": 18, "norm": "gn"}}, "device": "cpu", **base},
        "datasets": [
            {
                "name": "shapes",
                "format": "coco",
                "root": "data/shapes",
                "num_classes": 1,
                "synthetic": {"images": 4, "image_size": 64},
            },
        ],  # fmt: skip
    }
    path = folder / "configs" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_folder_over_the_upload_limit_is_refused_before_connecting(tmp_path):
    config = tiny_config(tmp_path)
    with (tmp_path / "weights.bin").open("wb") as big:  # sparse: no disk used
        big.truncate(upload_limit() + MIB)
    submit = ("submit", str(config), "--working-dir", str(tmp_path),
              "--address", "http://127.0.0.1:9")  # fmt: skip
    refused = jobs_cli(*submit)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    message = refused.stderr
    assert f"the working dir {tmp_path} would upload 101.0 MiB" in message
    assert "more than the 100.0 MiB the cluster's Jobs API accepts" in message
    assert "weights.bin (101.0 MiB)" in message and ".rayignore" in message
    # Left out with a .rayignore, the folder passes the check (and the cluster is then tried).
    (tmp_path / ".rayignore").write_text("/weights.bin\n")
    tried = jobs_cli(*submit)
    assert tried.returncode == 1 and "cannot reach the Ray Jobs API" in tried.stderr


def test_weights_named_by_relative_path_must_travel_with_the_job(tmp_path):
    config = tiny_config(tmp_path, model={"backbone": {"weights": "pretrained/R-18.pkl"}})
    job = SweepJob(config, tmp_path)
    with pytest.raises(ConfigError) as missing:
        job.check("submit")
    text = str(missing.value)
    assert "submit: configs/tiny.yaml: model.backbone.weights pretrained/R-18.pkl" in text
    assert "of datasets.0 (shapes) is not in the uploaded folder" in text
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "R-18.pkl").write_bytes(b"weights")
    job.check("submit")
    # A file the upload leaves out is as good as missing; an absolute path is the cluster's.
    job = SweepJob(config, tmp_path, ("base.model.backbone.weights=data/R-18.pkl",))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "R-18.pkl").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="is left out of the uploaded folder"):
        job.check("submit")
    SweepJob(config, tmp_path, ("base.model.backbone.weights=/nodes/R-18.pkl",)).check("x")


def test_a_credential_in_the_sweep_arguments_is_refused_before_connecting(tmp_path):
    """The Jobs API keeps a job's entrypoint and `jobs list` / `jobs status` print it: a
    password given as an override would be readable by anyone who reaches the cluster."""
    config = tiny_config(tmp_path)
    secret = "hunter2-in-the-uri"
    submit = ("submit", str(config), "--working-dir", str(tmp_path),
              "--address", "http://127.0.0.1:9", "--")  # fmt: skip
    for args in (
        (f"tracking.uri=postgresql://mlflow:{secret}@db:5432/mlflow",),
        (f"tracking.uri=http://mlflow:5000/?token={secret}",),
        ("name=x", f"storage.secret_access_key={secret}"),
    ):
        refused = jobs_cli(*submit, *args)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr and secret not in refused.stderr
        assert "submit: sweep argument " in refused.stderr
        assert "MLFLOW_TRACKING_PASSWORD" in refused.stderr
        assert "AWS_SECRET_ACCESS_KEY" in refused.stderr
    assert (
        "tracking.uri=postgresql://***@db:5432/mlflow carries a credential"
        in jobs_cli(*submit, f"tracking.uri=postgresql://mlflow:{secret}@db:5432/mlflow").stderr
    )
    # The same servers named without credentials pass the check (and the cluster is tried).
    tried = jobs_cli(*submit, "tracking.uri=postgresql://db:5432/mlflow", "name=x")
    assert tried.returncode == 1 and "cannot reach the Ray Jobs API" in tried.stderr
    # The scheduler submits through the same check, naming the schedule.
    job = SweepJob(config, tmp_path, (f"tracking.uri=http://u:{secret}@mlflow:5000",))
    with pytest.raises(ConfigError, match="^nightly-coco: sweep argument tracking.uri=http://"):
        job.check("nightly-coco")


def test_the_reason_of_a_ray_error_is_its_last_exception_line():
    assert ray_error_reason(RuntimeError(DUPLICATE_ID_ERROR)) == (
        "Job with submission_id dup-1 already exists. Please use a different submission_id."
    )
    too_big = "Request failed with status code 413: Maximum request body size 104857600 exceeded.."
    assert ray_error_reason(RuntimeError(too_big)) == too_big[:-1]
    unreachable = ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:9.")
    assert ray_error_reason(unreachable) == str(unreachable)
    assert ray_error_reason(RuntimeError()) == "RuntimeError"
