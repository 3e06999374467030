"""The scheduler: submits each schedule's sweep to the cluster on its cron expression.

Built on APScheduler 3 with its SQLAlchemy job store in the ``--state`` SQLite file, so the
schedules and their next fire times survive a restart; a fire time missed while the scheduler
was down runs once on restart if it is at most ``MISFIRE_GRACE_S`` late (coalesced).

Each fire time is acted on once:

- the submission id is ``<schedule>-<fire time, UTC>``: Ray refuses a second job with that id,
  and :class:`~orchestration.cluster.job_history.JobHistory` records every fire time it handled,
  so a
  scheduler killed and restarted neither re-submits nor forgets one;
- a schedule whose previous job is still pending or running on the cluster (asked of the Jobs
  API, since the job runs there, not here) skips that fire time, and the skip is recorded;
- a fire time whose job the cluster already has (a scheduler killed after submitting it and
  before recording it) is recorded as submitted, and its status is followed like any other.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor

from orchestration.cluster.job_history import FAILED, SKIPPED, SUBMITTED, JobHistory
from orchestration.cluster.ray_jobs import (
    META_FIRE_TIME,
    META_SCHEDULE,
    TERMINAL_STATUSES,
    AlreadySubmitted,
    JobsError,
    SweepJob,
    active_jobs,
    connect,
    status_text,
    submit,
)
from orchestration.cluster.schedules import ScheduleFile, cron_trigger

logger = logging.getLogger(__name__)

MISFIRE_GRACE_S = 3600
STATUS_REFRESH_S = 30
_STATUS_JOB = "__autoassign_refresh_statuses"
FOUND_ON_CLUSTER = "already on the cluster (submitted before a restart)"


@dataclass
class _Context:
    schedules: ScheduleFile
    history: JobHistory
    address: str | None


# APScheduler stores a job as a reference to a module-level function and its arguments;
# the loaded schedules file is what that function consults, set by :func:`run_scheduler`.
_context: _Context | None = None


def submission_id(schedule: str, fire_time: datetime) -> str:
    return f"{schedule}-{fire_time.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def fire_key(fire_time: datetime) -> str:
    return f"{fire_time.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def fire_schedule(name: str, fingerprint: str = "", fire_time: datetime | None = None) -> str:
    """Submit schedule ``name``'s sweep for ``fire_time`` unless it is handled or its last
    job still runs; returns the action recorded (or ``"done before"``)."""
    context = _context
    assert context is not None, "fire_schedule runs inside run_scheduler"
    fire_time = fire_time or datetime.now(timezone.utc)
    key = fire_key(fire_time)
    history = context.history
    if history.handled(name, key):
        logger.info("%s at %s: handled before a restart; nothing to do", name, key)
        return "done before"
    schedule = context.schedules.schedule(name)
    job_id = submission_id(name, fire_time)
    try:
        client = connect(context.address)
        running = active_jobs(client, name)
        if any(job.submission_id == job_id for job in running):
            _record(history, name, key, SUBMITTED, job_id, FOUND_ON_CLUSTER)
            return SUBMITTED
        if running:
            previous = running[0]
            detail = f"previous job {previous.submission_id} still {status_text(previous)}"
            _record(history, name, key, SKIPPED, previous.submission_id, detail)
            return SKIPPED
        job = SweepJob(schedule.config, context.schedules.working_dir, tuple(schedule.args))
        submit(
            client,
            job,
            submission_id=job_id,
            metadata={META_SCHEDULE: name, META_FIRE_TIME: key},
        )
    except AlreadySubmitted:
        _record(history, name, key, SUBMITTED, job_id, FOUND_ON_CLUSTER)
        return SUBMITTED
    except JobsError as error:
        _record(history, name, key, FAILED, None, str(error))
        return FAILED
    _record(history, name, key, SUBMITTED, job_id, "")
    return SUBMITTED


def _record(history: JobHistory, name: str, key: str, action: str, job_id, detail: str) -> None:
    if history.record(name, key, action, job_id, detail):
        print(f"{key} {name}: {action} {job_id or ''} {detail}".rstrip(), flush=True)


def refresh_statuses(history: JobHistory, address: str | None) -> int:
    """Record the final status of submitted jobs that have ended; how many were updated."""
    pending = history.unfinished_submissions()
    if not pending:
        return 0
    client = connect(address)
    updated = 0
    for job_id in pending:
        try:
            status = status_text(client.get_job_info(job_id))
        except RuntimeError:  # the cluster forgot it (a new head node)
            continue
        if status in TERMINAL_STATUSES:
            history.set_final_status(job_id, status)
            updated += 1
    return updated


def _refresh_job() -> None:
    context = _context
    if context is None:
        return
    try:
        refresh_statuses(context.history, context.address)
    except JobsError as error:
        logger.warning("job statuses not refreshed: %s", error)


class FireTimeExecutor(ThreadPoolExecutor):
    """A thread pool that hands each run its scheduled fire time as ``fire_time=``.

    APScheduler 3 calls a job's function with the stored arguments only; the fire time is
    what makes a submission unique, so it is passed in here. Jobs are coalesced, so APScheduler
    asks for one run time at a time (the latest, when several were missed).
    """

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        super()._do_submit_job(_AtFireTime(job, run_times[-1]), run_times[-1:])


class _AtFireTime:
    """The job as APScheduler's ``run_job`` sees it, with ``fire_time`` among its kwargs."""

    def __init__(self, job: Any, fire_time: datetime):
        self._job = job
        self.kwargs = {**job.kwargs, "fire_time": fire_time} if job.id != _STATUS_JOB else {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def __str__(self) -> str:
        return str(self._job)


def build_scheduler(state: Path, timezone_name: str) -> Any:
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    return BackgroundScheduler(
        jobstores={
            "default": SQLAlchemyJobStore(url=f"sqlite:///{state}"),
            "memory": MemoryJobStore(),  # the status refresher is not a schedule
        },
        executors={"default": FireTimeExecutor(max_workers=4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=timezone_name,
    )


def sync_schedules(scheduler: Any, schedules: ScheduleFile) -> list[str]:
    """Make the stored jobs match the file: new schedules added, changed cron expressions
    re-planned, removed ones dropped; unchanged ones keep their stored next fire time.
    Returns one line per schedule saying which."""
    lines = []
    wanted = {s.name for s in schedules.schedules}
    for job in scheduler.get_jobs(jobstore="default"):
        if job.id not in wanted:
            scheduler.remove_job(job.id, jobstore="default")
            lines.append(f"{job.id}: removed (no longer in the file)")
    for schedule in schedules.schedules:
        fingerprint = f"{schedule.cron}|{schedules.timezone}"
        existing = scheduler.get_job(schedule.name, jobstore="default")
        if existing is not None and existing.kwargs.get("fingerprint") == fingerprint:
            lines.append(f"{schedule.name}: kept, next at {existing.next_run_time}")
            continue
        job = scheduler.add_job(
            fire_schedule,
            cron_trigger(schedule.cron, schedules.timezone),
            id=schedule.name,
            name=schedule.name,
            args=[schedule.name],
            kwargs={"fingerprint": fingerprint},
            jobstore="default",
            replace_existing=True,
        )
        verb = "re-planned" if existing is not None else "added"
        lines.append(f"{schedule.name}: {verb} ({schedule.cron}), next at {job.next_run_time}")
    return lines


def run_scheduler(schedules: ScheduleFile, state: Path, *, address: str | None) -> None:
    """Run until SIGTERM or SIGINT; every submission and skip goes to the state file."""
    global _context
    state.parent.mkdir(parents=True, exist_ok=True)
    history = JobHistory(state)
    _context = _Context(schedules, history, address or schedules.address)
    scheduler = build_scheduler(state, schedules.timezone)
    scheduler.start(paused=True)
    for line in sync_schedules(scheduler, schedules):
        print(line, flush=True)
    scheduler.add_job(
        _refresh_job, "interval", seconds=STATUS_REFRESH_S, id=_STATUS_JOB, jobstore="memory"
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"scheduler running ({len(schedules.schedules)} schedule(s), state {state})", flush=True)
    scheduler.resume()
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        _context = None
        print("scheduler stopped", flush=True)
