"""Sweeps on a Ray cluster as Ray Jobs, and the scheduler that submits them on cron times.

    python -m orchestration.jobs submit CONFIG [--address http://HEAD:8265] [-- SWEEP ARGS]
    python -m orchestration.jobs status ID | logs ID [--follow] | stop ID [--wait] | list
    python -m orchestration.jobs schedule SCHEDULES.yaml [--state PATH]
    python -m orchestration.jobs history [--state PATH] [--schedule NAME]

``--address`` defaults to ``RAY_ADDRESS`` (the schedules file's ``address`` for ``schedule``).
``submit`` uploads the current folder (``--working-dir``) without data, runs, virtualenvs and
``.env`` files, and runs ``python -m orchestration.sweep CONFIG`` there (see
:mod:`orchestration.cluster.ray_jobs`); the scheduler is :mod:`orchestration.cluster.scheduler`.

Exit status: 0 done; 1 the cluster cannot be reached, or the job failed (``logs --follow``,
``stop --wait``); 2 bad arguments, a bad schedules file, or a job id the cluster does not know.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from autoassign.errors import ConfigError
from orchestration.cluster.ray_jobs import (
    META_SCHEDULE,
    TERMINAL_STATUSES,
    JobsError,
    SweepJob,
    connect,
    job_info,
    status_text,
    submit,
    unauthorised,
)
from orchestration.results.compare import render

DEFAULT_STATE = Path("runs/scheduler/state.db")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Everything after a ``--`` goes to the sweep (``submit ... -- name=x --dry-run``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, sweep_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.jobs",
        description="Run sweeps on a Ray cluster as Ray Jobs, now or on a cron schedule.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_address(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--address", help="the Jobs API, http://HEAD:8265 (RAY_ADDRESS)")
        return sub

    sub = with_address(commands.add_parser("submit", help="submit a sweep; prints the job id"))
    sub.add_argument("config", type=Path)
    sub.add_argument("--working-dir", type=Path, default=Path("."), help="uploaded (default .)")
    sub.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    for name, text in (("status", "a job's status"), ("stop", "stop a running job")):
        sub = with_address(commands.add_parser(name, help=text))
        sub.add_argument("job_id")
        if name == "stop":
            sub.add_argument("--wait", action="store_true", help="until it has stopped")
    sub = with_address(commands.add_parser("logs", help="a job's driver log"))
    sub.add_argument("job_id")
    sub.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    with_address(commands.add_parser("list", help="the cluster's jobs"))
    sub = commands.add_parser("schedule", help="run the scheduler (until SIGTERM/Ctrl-C)")
    sub.add_argument("schedules", type=Path)
    sub.add_argument("--state", type=Path, default=DEFAULT_STATE)
    sub.add_argument("--address", help="overrides the file's address")
    sub = with_address(commands.add_parser("history", help="what the scheduler did"))
    sub.add_argument("--state", type=Path, default=DEFAULT_STATE)
    sub.add_argument("--schedule", help="only this schedule")
    args = parser.parse_args(argv)
    if sweep_args and args.command != "submit":
        parser.error("arguments after -- are for `submit` only")
    args.sweep_args = sweep_args
    return args


def run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "schedule":
        return _schedule(args)
    if command == "history":
        return _history(args)
    if command == "submit":
        job = SweepJob(args.config, args.working_dir, tuple(args.sweep_args))
        job.check("submit")  # before connecting: bad input says so wherever the cluster is
        job_id = submit(connect(args.address), job, submission_id=args.submission_id)
        print(job_id)
        return 0
    client = connect(args.address)
    if command == "status":
        info = job_info(client, args.job_id)
        print(f"{args.job_id}: {status_text(info)}")
        for label, value in (
            ("entrypoint", info.entrypoint),
            ("message", info.message),
            ("started", _time(info.start_time)),
            ("ended", _time(info.end_time)),
        ):
            if value:
                print(f"  {label}: {value}")
        return 0
    if command == "logs":
        job_info(client, args.job_id)  # a clear error for an unknown id
        return _logs(client, args.job_id, args.follow)
    if command == "stop":
        info = job_info(client, args.job_id)
        if status_text(info) in TERMINAL_STATUSES:
            print(f"{args.job_id}: already {status_text(info)}")
            return 0
        client.stop_job(args.job_id)
        print(f"{args.job_id}: stop requested")
        if args.wait:
            status = _wait_until_ended(client, args.job_id)
            print(f"{args.job_id}: {status}")
        return 0
    if command == "list":
        header = ["job id", "status", "started", "schedule", "entrypoint"]
        rows = []
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            rows.append(
                [
                    job.submission_id or job.job_id or "",
                    status_text(job),
                    _time(job.start_time),
                    (job.metadata or {}).get(META_SCHEDULE, ""),
                    job.entrypoint or "",
                ]
            )
        print(render(header, rows, "table"), end="")
        return 0
    raise AssertionError(command)


def _logs(client, job_id: str, follow: bool) -> int:
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = _wait_until_ended(client, job_id)
    print(f"{job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _wait_until_ended(client, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = status_text(client.get_job_info(job_id))
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_s)


def _schedule(args: argparse.Namespace) -> int:
    from orchestration.cluster.scheduler import run_scheduler
    from orchestration.cluster.schedules import load_schedule_file

    schedules = load_schedule_file(args.schedules)
    run_scheduler(schedules, args.state, address=args.address)
    return 0


def _history(args: argparse.Namespace) -> int:
    from orchestration.cluster.job_history import JobHistory
    from orchestration.cluster.scheduler import refresh_statuses

    if not args.state.is_file():
        raise ConfigError(f"{args.state}: no scheduler state here (see --state)")
    history = JobHistory(args.state)
    if args.address or _env_address():
        try:
            refresh_statuses(history, args.address)
        except JobsError as error:
            print(f"warning: statuses not refreshed: {error}", file=sys.stderr)
    header = ["fire time", "schedule", "action", "job id", "status", "detail"]
    rows = []
    for event in history.events(args.schedule):
        rows.append(
            [
                event.fire_time,
                event.schedule,
                event.action,
                event.job_id or "",
                event.final_status or "",
                event.detail,
            ]
        )
    print(render(header, rows, "table"), end="")
    return 0


def _env_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS")


def _time(milliseconds: int | None) -> str:
    if not milliseconds:
        return ""
    from datetime import datetime, timezone

    moment = datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 for bad arguments
        return int(exit_.code or 0)
    from ray.exceptions import AuthenticationError

    try:
        return run(args)
    except AuthenticationError:
        print(f"error: {unauthorised(args.address or _env_address() or '?')}", file=sys.stderr)
        return 1
    except JobsError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
