"""What the scheduler did, kept beside its job store: every submission and every skip.

One row per fire time of a schedule (``schedule``, ``fire_time`` unique), with what happened:
``submitted`` (the Ray job id, and its final status once the cluster reports one),
``skipped`` (the schedule's previous job was still running: its id and status) or
``failed`` (the Jobs API refused or could not be reached: why). A fire time that already has
a row is never acted on again, which is what keeps a restarted scheduler from submitting it
twice (Ray's refusal of a known submission id is the second guard).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SUBMITTED, SKIPPED, FAILED = "submitted", "skipped", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS autoassign_schedule_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at TEXT NOT NULL,
    schedule TEXT NOT NULL,
    fire_time TEXT NOT NULL,
    action TEXT NOT NULL,
    job_id TEXT,
    detail TEXT NOT NULL DEFAULT '',
    final_status TEXT,
    UNIQUE (schedule, fire_time)
)
"""


@dataclass(frozen=True)
class Event:
    recorded_at: str
    schedule: str
    fire_time: str
    action: str
    job_id: str | None
    detail: str
    final_status: str | None


class JobHistory:
    """The events table in the scheduler's state file (SQLite, shared with APScheduler)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def handled(self, schedule: str, fire_time: str) -> bool:
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM autoassign_schedule_events WHERE schedule = ? AND fire_time = ?",
                (schedule, fire_time),
            ).fetchone()
        return row is not None

    def record(
        self, schedule: str, fire_time: str, action: str, job_id: str | None, detail: str = ""
    ) -> bool:
        """Add the fire time's event; False when the fire time already had one."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO autoassign_schedule_events "
                    "(recorded_at, schedule, fire_time, action, job_id, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (now, schedule, fire_time, action, job_id, detail),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def set_final_status(self, job_id: str, status: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE autoassign_schedule_events SET final_status = ? "
                "WHERE job_id = ? AND action = ?",
                (status, job_id, SUBMITTED),
            )

    def unfinished_submissions(self) -> list[str]:
        """Ids of submitted jobs whose final status is not known yet."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT job_id FROM autoassign_schedule_events "
                "WHERE action = ? AND final_status IS NULL AND job_id IS NOT NULL",
                (SUBMITTED,),
            ).fetchall()
        return [row[0] for row in rows]

    def events(self, schedule: str | None = None) -> list[Event]:
        query = (
            "SELECT recorded_at, schedule, fire_time, action, job_id, detail, final_status "
            "FROM autoassign_schedule_events"
        )
        args: tuple = ()
        if schedule is not None:
            query += " WHERE schedule = ?"
            args = (schedule,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY fire_time, id", args).fetchall()
        return [Event(*row) for row in rows]
