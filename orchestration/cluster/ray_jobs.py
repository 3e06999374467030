"""Sweeps as Ray Jobs: submitting one to a cluster's Jobs API, and asking about the jobs there.

A sweep job runs ``python -m orchestration.sweep CONFIG`` as the job's driver on the head
node, with the project folder (the current directory by default) uploaded as the runtime
environment's ``working_dir``, so the cluster runs the code and configs the user has, without
their datasets, runs, virtualenvs and ``.env`` files. Inside the job Ray sets ``RAY_ADDRESS``,
so the sweep joins the cluster instead of starting a Ray of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.errors import ConfigError
from autoassign.weight_names import is_weights_name
from orchestration.common.error_text import ray_error_reason

# What a sweep job never uploads. Ray reads these as .gitignore lines: a pattern without a
# slash matches at any depth ("data" would also drop the autoassign/data package), a leading
# "/" anchors it to the top of the uploaded folder.
WORKING_DIR_EXCLUDES = [
    "/runs",  # sweep outputs
    "/data",  # datasets (the cluster has its own)
    ".git",  # any depth: repositories and submodules
    ".venv",  # any depth: no package is called that
    "/venv",
    "**/__pycache__",
    "*.egg-info",
    ".env",  # credentials, at any depth
    ".env.*",  # .env.local and the like; .env.example too, which no job reads
]
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE_STATUSES = ("PENDING", "RUNNING")
META_SCHEDULE = "autoassign_schedule"
META_FIRE_TIME = "autoassign_fire_time"
META_CONFIG = "autoassign_config"
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 120.0
UPLOAD_LIMIT_FALLBACK = 100 * 1024**2
"""The Jobs API's request-size limit when the installed Ray does not say (Ray 2.60: 100 MiB)."""

# Ray's refusal of a submission id it already has: "Job with submission_id X already exists."
_ALREADY_EXISTS = re.compile(r"submission_id \S+ already exists")
# The exception line that ends a Python traceback: "ValueError: msg", "pkg.mod.SomeError: msg".


class JobsError(Exception):
    """A Jobs API that cannot be reached or refuses (``exit_code`` 1), or a job that does not
    exist or a folder that cannot be uploaded (2)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class AlreadySubmitted(JobsError):
    """The cluster already has a job with this submission id (Ray refuses a second one)."""

    def __init__(self, submission_id: str):
        super().__init__(
            f"submission refused: the cluster already has a job with submission id "
            f"{submission_id!r} (it keeps the ids of ended jobs too); choose another id",
            1,
        )
        self.submission_id = submission_id


@dataclass(frozen=True)
class SweepJob:
    """What to submit: the sweep config, relative to the uploaded folder, and its extras."""

    config: Path
    working_dir: Path
    sweep_args: tuple[str, ...] = ()

    @property
    def entrypoint(self) -> str:
        import shlex

        relative = self.config.resolve().relative_to(self.working_dir.resolve())
        words = ["python", "-m", "orchestration.sweep", relative.as_posix(), *self.sweep_args]
        return " ".join(shlex.quote(word) for word in words)

    def check(self, where: str) -> None:
        """Raise ConfigError (naming ``where``) unless the job can run as submitted: the
        config inside the working dir, the files it names by relative path uploaded with it,
        and the upload within the cluster's limit (which :func:`submit` checks again, since
        a scheduler's folder can grow between its start and a fire time)."""
        if not self.working_dir.is_dir():
            raise ConfigError(f"{where}: working dir {self.working_dir} is not a folder")
        if not self.config.is_file():
            raise ConfigError(f"{where}: config {self.config} does not exist")
        try:
            self.config.resolve().relative_to(self.working_dir.resolve())
        except ValueError:
            raise ConfigError(
                f"{where}: config {self.config} is outside the working dir {self.working_dir}, "
                "which is what the job uploads"
            ) from None
        self.check_no_secrets(where)
        self.check_named_files(where)
        check_upload_size(self.working_dir, where)

    def check_no_secrets(self, where: str) -> None:
        """A secret in the sweep's arguments would be part of the job's entrypoint, which
        the Jobs API keeps and shows to whoever lists the cluster's jobs; refuse it and say
        where a credential belongs instead."""
        from orchestration.common.redaction import SECRET_NAME, redact

        for arg in self.sweep_args:
            key, equals, value = arg.partition("=")
            if not equals:
                continue
            if SECRET_NAME.search(key.rsplit(".", 1)[-1]):
                shown, why = f"{key}=***", "sets a secret-named field"
            elif redact(value) != value:
                shown, why = f"{key}={redact(value)}", "carries a credential or a signed query"
            else:
                continue
            raise ConfigError(
                f"{where}: sweep argument {shown} {why}; the job's entrypoint, with its "
                "arguments, is shown by `jobs list` and `jobs status` to anyone who reaches "
                "the cluster. Give credentials to the cluster's environment instead: "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for the tracking server, "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3"
            )

    def check_named_files(self, where: str) -> None:
        """Each weights or checkpoint file the sweep's trials start from, when named by a
        relative path, must be in the uploaded folder: the job runs there, on the head.

        Absolute paths are on the cluster's disks, which only the sweep itself can look at.
        """
        from orchestration.definition.config_loading import load_sweep_config
        from orchestration.definition.trial_experiments import trial_experiment

        overrides = [arg for arg in self.sweep_args if "=" in arg and not arg.startswith("-")]
        try:
            sweep = load_sweep_config(self.config, overrides)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        root = self.working_dir.resolve()
        is_excluded = _excluded(root)
        missing: dict[tuple[str, Path], list[str]] = {}  # (field, path) -> the datasets
        for index, dataset in enumerate(sweep.datasets):
            experiment = trial_experiment(sweep, dataset, {}, source=str(self.config))
            for key, path in (
                ("model.backbone.weights", experiment.model.backbone.weights),
                ("model.checkpoint", experiment.model.checkpoint),
            ):
                if path is None or is_weights_name(path) or Path(path).is_absolute():
                    continue  # a name is fetched by the sweep, an absolute path is the nodes'
                if not (root / path).is_file() or is_excluded(root / path):
                    missing.setdefault((key, Path(path)), []).append(
                        f"datasets.{index} ({dataset.name})"
                    )
        config = self.config.resolve().relative_to(root)
        problems = []
        for (key, path), datasets in missing.items():
            where_not = "left out of" if (root / path).is_file() else "not in"
            problems.append(
                f"{where}: {config}: {key} {path} of {', '.join(datasets)} is {where_not} the "
                f"uploaded folder {root}: the job runs there, so its trials would fail on the "
                f"cluster. Put the file at {root / path}, or name one that every Ray node has "
                "by its absolute path"
            )
        if problems:
            raise ConfigError("\n".join(problems))


def _excluded(root: Path) -> Any:
    """Ray's own test of whether a path in ``root`` is left out by WORKING_DIR_EXCLUDES."""
    from ray._private.runtime_env.packaging import _get_excludes

    return _get_excludes(root, WORKING_DIR_EXCLUDES)


def upload_limit() -> int:
    """The largest request body, in bytes, the dashboard's Jobs API accepts (a package)."""
    try:
        from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    except ImportError:
        return UPLOAD_LIMIT_FALLBACK
    return int(DASHBOARD_CLIENT_MAX_SIZE)


def upload_sizes(working_dir: Path) -> dict[str, int]:
    """Bytes each top-level entry of ``working_dir`` adds to the job's package, walked the
    way Ray builds it (WORKING_DIR_EXCLUDES, then any .gitignore and .rayignore in it).

    Ray stores files uncompressed in the package zip, so their sizes plus a header per file
    (the name twice and about 80 bytes) are its size.
    """
    import os

    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel

    root = working_dir.resolve()
    sizes: dict[str, int] = {}

    def add(path: Path) -> None:
        if path == root or not (path.is_file() or (path.is_dir() and not any(path.iterdir()))):
            return
        relative = path.relative_to(root)
        size = path.stat().st_size if path.is_file() else 0
        top = relative.parts[0]
        sizes[top] = sizes.get(top, 0) + size + 80 + 2 * len(str(relative).encode())

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    _dir_travel(root, [_excluded(root)], add, include_gitignore=include_gitignore)
    return sizes


def check_upload_size(working_dir: Path, where: str) -> None:
    """ConfigError unless the package of ``working_dir`` fits the Jobs API's limit, naming
    its size, the largest entries and how to leave them out."""
    sizes = upload_sizes(working_dir)
    total, limit = sum(sizes.values()), upload_limit()
    if total <= limit:
        return
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    shown = ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
    raise ConfigError(
        f"{where}: the working dir {working_dir} would upload {_mib(total)}, more than the "
        f"{_mib(limit)} the cluster's Jobs API accepts. Largest entries: {shown}. Move what "
        "the job does not need out of the folder, or list it in a .rayignore file there "
        "(.gitignore syntax; already left out: " + ", ".join(WORKING_DIR_EXCLUDES) + ")"
    )


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (None: ``RAY_ADDRESS``), or JobsError."""
    import os

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        raise JobsError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS", 2)
    try:
        return JobSubmissionClient(target)
    except AuthenticationError:
        raise JobsError(unauthorised(target), 1) from None
    except (ConnectionError, ValueError, RuntimeError) as error:
        reason = ray_error_reason(error)
        raise JobsError(f"cannot reach the Ray Jobs API at {target}: {reason}") from None


def unauthorised(target: str) -> str:
    return (
        f"the Ray cluster at {target} wants its auth token: put the cluster's token in "
        "~/.ray/auth_token, or name its file in RAY_AUTH_TOKEN_PATH (or give it in "
        "RAY_AUTH_TOKEN)"
    )


def submit(
    client: Any,
    job: SweepJob,
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit the sweep; returns the submission id.

    Raises AlreadySubmitted when the cluster has a job with ``submission_id`` already, and
    JobsError (exit 2) before uploading anything when the folder is larger than the cluster
    accepts. A head node that has just started answers "No available agent to submit job,
    please try again later" until its job agent is up: that answer is retried for up to
    ``AGENT_WAIT_S`` seconds; every other refusal is final.
    """
    import time

    try:
        check_upload_size(job.working_dir, "submission refused")
    except ConfigError as error:
        raise JobsError(str(error), 2) from None
    meta = {META_CONFIG: job.config.as_posix(), **(metadata or {})}
    runtime_env = {"working_dir": str(job.working_dir), "excludes": WORKING_DIR_EXCLUDES}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=job.entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata=meta,
            )
        except (RuntimeError, ValueError) as error:
            text = str(error)
            if NO_AGENT_YET in text and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            if submission_id is not None and _ALREADY_EXISTS.search(text):
                raise AlreadySubmitted(submission_id) from None
            if "status code 413" in text:  # the size check above misjudged the package
                raise JobsError(
                    f"submission refused: the upload of {job.working_dir} is larger than the "
                    f"{_mib(upload_limit())} the cluster's Jobs API accepts; leave big files "
                    "out with a .rayignore file in that folder",
                    2,
                ) from None
            raise JobsError(f"submission refused: {ray_error_reason(error)}", 1) from None


def job_info(client: Any, job_id: str) -> Any:
    """The job's details, or JobsError (exit 2) naming the ids that do exist."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            known = [job.submission_id for job in client.list_jobs() if job.submission_id]
            shown = ", ".join(known[-10:]) or "(none)"
            raise JobsError(f"no job {job_id!r} on this cluster; recent jobs: {shown}", 2) from None
        raise JobsError(f"cannot ask about job {job_id!r}: {ray_error_reason(error)}", 1) from None


def active_jobs(client: Any, schedule: str) -> list[Any]:
    """The schedule's jobs that are still pending or running on the cluster."""
    return [
        job
        for job in client.list_jobs()
        if (job.metadata or {}).get(META_SCHEDULE) == schedule
        and status_text(job) in ACTIVE_STATUSES
    ]


def status_text(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))
