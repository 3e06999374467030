"""The schedules file: which sweeps the scheduler submits to a cluster, and when.

    address: http://127.0.0.1:8265        # the Ray Jobs API; RAY_ADDRESS when left out
    working_dir: .                        # uploaded with each job (relative to this file)
    timezone: UTC                         # of the cron expressions
    schedules:
      - name: nightly-multi-dataset
        cron: "0 2 * * *"                  # five fields, or six with seconds first
        config: configs/multi_dataset.yaml # relative to working_dir
        args: []                           # extra `orchestration.sweep` arguments

Cron fields follow cron: ``minute hour day-of-month month day-of-week`` with day-of-week
0 or 7 = Sunday (numbers are turned into names, since APScheduler counts from Monday), and
a leading seconds field when there are six. Parsing is APScheduler's ``CronTrigger``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autoassign.errors import ConfigError

_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Schedule(_Strict):
    name: str
    cron: str
    config: Path
    args: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "use letters, digits, '.', '_' and '-' (it becomes part of job ids), "
                f"at most 64 characters; got {value!r}"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        cron_trigger(value, "UTC")  # raises ValueError with APScheduler's reason
        return value


class ScheduleFile(_Strict):
    address: str | None = None
    working_dir: Path = Path(".")
    timezone: str = "UTC"
    schedules: list[Schedule] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Paris)") from None
        return value

    @model_validator(mode="after")
    def _unique(self) -> ScheduleFile:
        names = [s.name for s in self.schedules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"schedule names must be unique; repeated: {', '.join(twice)}")
        return self

    def schedule(self, name: str) -> Schedule:
        return next(s for s in self.schedules if s.name == name)


def cron_trigger(expression: str, timezone: str) -> Any:
    """An APScheduler ``CronTrigger`` for a five- or six-field (seconds first) expression."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"{expression!r} has {len(fields)} fields; want 5 (minute hour day month weekday) "
            "or 6 (seconds first)"
        )
    if len(fields) == 5:
        fields = ["0", *fields]
    second, minute, hour, day, month, day_of_week = fields
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_cron_weekdays(day_of_week),
            timezone=timezone,
        )
    except ValueError as error:
        raise ValueError(f"{expression!r}: {error}") from None


def _cron_weekdays(field: str) -> str:
    """Cron's numbered weekdays (0 and 7 Sunday) as names, which APScheduler reads right."""

    def name(match: re.Match) -> str:
        number = int(match.group(0))
        if number > 7:
            raise ValueError(f"day of week {number} is not 0-7")
        return _DAY_NAMES[number]

    # Numbers after a "/" are steps, not days.
    return re.sub(r"(?<![/\d])\d+", name, field)


def load_schedule_file(path: Path) -> ScheduleFile:
    """Read and check the file; ConfigError names the schedule and the field that is wrong.

    Relative ``working_dir`` is taken from the file's folder; each ``config`` must exist
    inside it (that folder is what every job uploads), be a valid sweep with the schedule's
    ``args`` as overrides, and find there the weight and checkpoint files it names by
    relative path; the folder must fit the cluster's upload limit. What only the cluster can
    see (dataset folders, absolute paths) the sweep checks when its job starts.
    """
    import yaml
    from pydantic import ValidationError

    from orchestration.cluster.ray_jobs import SweepJob, check_upload_size

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the schedules file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'schedules'")
    try:
        parsed = ScheduleFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(path, data, error)) from None
    if not parsed.working_dir.is_absolute():
        parsed.working_dir = (path.parent / parsed.working_dir).resolve()
    for index, schedule in enumerate(parsed.schedules):
        config = schedule.config
        if not config.is_absolute():
            config = parsed.working_dir / config
        where = f"{path}: schedules[{index}] ({schedule.name}) field 'config'"
        if not config.is_file():
            raise ConfigError(f"{where}: {config} does not exist")
        try:
            config.resolve().relative_to(parsed.working_dir)
        except ValueError:
            raise ConfigError(
                f"{where}: {config} is outside working_dir {parsed.working_dir}"
            ) from None
        schedule.config = config.resolve()
        job = SweepJob(schedule.config, parsed.working_dir, tuple(schedule.args))
        job.check_named_files(f"{path}: schedules[{index}] ({schedule.name}) field 'config'")
    check_upload_size(parsed.working_dir, f"{path}: field 'working_dir'")  # once: one folder
    return parsed


def _describe(path: Path, data: dict, error: Any) -> str:
    lines = []
    for item in error.errors():
        location = item["loc"]
        where = ".".join(str(part) for part in location) or "(top level)"
        if len(location) >= 2 and location[0] == "schedules" and isinstance(location[1], int):
            schedules = data.get("schedules") or []
            entry = schedules[location[1]] if location[1] < len(schedules) else {}
            name = entry.get("name", "?") if isinstance(entry, dict) else "?"
            field = ".".join(str(part) for part in location[2:]) or "(entry)"
            where = f"schedules[{location[1]}] ({name}) field '{field}'"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {where}: {message}")
    return "\n".join(lines)
