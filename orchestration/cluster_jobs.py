"""Sweeps as Ray Jobs: submitting one to a cluster's Jobs API, and asking about the jobs there.

A sweep job runs ``python -m orchestration.sweep CONFIG`` as the job's driver on the head
node, with the project folder (the current directory by default) uploaded as the runtime
environment's ``working_dir``, so the cluster runs the code and configs the user has, without
their datasets, runs and virtualenvs. Inside the job Ray sets ``RAY_ADDRESS``, so the sweep
joins the cluster instead of starting a Ray of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.errors import ConfigError

# What a sweep job never needs to upload (Ray's working_dir excludes use .gitignore syntax).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "data",
    "**/__pycache__",
    "*.egg-info",
    ".env",
]
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE_STATUSES = ("PENDING", "RUNNING")
META_SCHEDULE = "autoassign_schedule"
META_FIRE_TIME = "autoassign_fire_time"
META_CONFIG = "autoassign_config"
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 120.0


class JobsError(Exception):
    """A Jobs API that cannot be reached (``exit_code`` 1) or a job that does not exist (2)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


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
        """Raise ConfigError (naming ``where``) unless the config can travel with the job."""
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
        reason = _first_line(error)
        raise JobsError(f"cannot reach the Ray Jobs API at {target}: {reason}") from None


def unauthorised(target: str) -> str:
    return (
        f"the Ray cluster at {target} wants its auth token: set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token"
    )


def submit(
    client: Any,
    job: SweepJob,
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit the sweep; returns the submission id (Ray refuses one it already has).

    A head node that has just started answers "No available agent to submit job, please try
    again later" until its job agent is up: that answer is retried for up to
    ``AGENT_WAIT_S`` seconds; every other refusal is final.
    """
    import time

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
            if NO_AGENT_YET in str(error) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise JobsError(f"submission refused: {_first_line(error)}", 1) from None


def job_info(client: Any, job_id: str) -> Any:
    """The job's details, or JobsError (exit 2) naming the ids that do exist."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            known = [job.submission_id for job in client.list_jobs() if job.submission_id]
            shown = ", ".join(known[-10:]) or "(none)"
            raise JobsError(f"no job {job_id!r} on this cluster; recent jobs: {shown}", 2) from None
        raise JobsError(f"cannot ask about job {job_id!r}: {_first_line(error)}", 1) from None


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
