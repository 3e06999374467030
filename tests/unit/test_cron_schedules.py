"""The schedules file, cron expressions, the scheduler's history and the jobs CLI's errors,
without a cluster. Submitting, skipping and restarting against a real Ray head are in
tests/integration/test_cluster_jobs.py."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from autoassign.errors import ConfigError
from orchestration.cluster.job_history import SKIPPED, SUBMITTED, JobHistory
from orchestration.cluster.scheduler import fire_key, submission_id
from orchestration.cluster.schedules import cron_trigger, load_schedule_file

REPO = Path(__file__).resolve().parents[2]
UTC = timezone.utc


def fire_times(expression: str, start: datetime, count: int) -> list[datetime]:
    trigger = cron_trigger(expression, "UTC")
    times, previous, now = [], None, start
    for _ in range(count):
        previous = trigger.get_next_fire_time(previous, now)
        times.append(previous)
        now = previous
    return times


def test_five_fields_fire_on_the_minute_with_cron_weekdays():
    # 2026-12-04 is a Friday. "0 2 * * 1-5": 02:00 Monday to Friday, as cron reads 1-5.
    start = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    times = fire_times("0 2 * * 1-5", start, 3)
    assert [t.strftime("%a %H:%M:%S") for t in times] == [
        "Mon 02:00:00", "Tue 02:00:00", "Wed 02:00:00",
    ]  # fmt: skip
    # Cron's 0 and 7 are Sunday (APScheduler alone would read 0 as Monday).
    assert fire_times("30 6 * * 0", start, 1)[0].strftime("%a %H:%M") == "Sun 06:30"
    assert fire_times("30 6 * * 7", start, 1)[0].strftime("%a %H:%M") == "Sun 06:30"


def test_six_fields_put_seconds_first():
    start = datetime(2026, 12, 4, 3, 0, 0, tzinfo=UTC)
    times = fire_times("*/20 * * * * *", start, 4)
    assert [t.second for t in times] == [0, 20, 40, 0]  # the first is start itself
    assert times[1] - times[0] == times[2] - times[1]


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 2 * *", "has 4 fields"),
        ("0 25 * * *", "25"),
        ("0 2 * * 9", "day of week 9 is not 0-7"),
        ("every night", "has 2 fields"),
    ],
)
def test_bad_cron_names_the_schedule_and_field(tmp_path, cron, message):
    (tmp_path / "sweep.yaml").write_text("name: x\n")
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - {name: ok, cron: '0 1 * * *', config: sweep.yaml}\n"
        f"  - {{name: nightly, cron: '{cron}', config: sweep.yaml}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_schedule_file(path)
    text = str(raised.value)
    assert f"{path}: schedules[1] (nightly) field 'cron'" in text and message in text


def test_unknown_config_and_duplicate_names(tmp_path):
    path = tmp_path / "schedules.yaml"
    path.write_text("schedules:\n  - {name: nightly, cron: '0 2 * * *', config: nope.yaml}\n")
    with pytest.raises(ConfigError, match=r"schedules\[0\] \(nightly\) field 'config'.*nope"):
        load_schedule_file(path)
    (tmp_path / "a.yaml").write_text("name: a\n")
    path.write_text(
        "schedules:\n"
        "  - {name: n, cron: '0 2 * * *', config: a.yaml}\n"
        "  - {name: n, cron: '0 3 * * *', config: a.yaml}\n"
    )
    with pytest.raises(ConfigError, match="repeated: n"):
        load_schedule_file(path)


TINY_SWEEP = """\
name: tiny
base: {device: cpu, model: {backbone: {depth: 18, norm: gn, weights: WEIGHTS}}}
datasets:
  - {name: shapes, format: coco, root: data/shapes, num_classes: 1, synthetic: {images: 4}}
"""


def test_configs_resolve_inside_the_working_dir(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "sweep.yaml").write_text(TINY_SWEEP.replace("WEIGHTS", "null"))
    path = project / "schedules.yaml"
    path.write_text(
        "address: http://127.0.0.1:8265\n"
        "schedules:\n"
        "  - {name: n, cron: '0 2 * * *', config: configs/sweep.yaml, args: [--dry-run]}\n"
    )
    parsed = load_schedule_file(path)
    assert parsed.working_dir == project.resolve()
    assert parsed.schedules[0].config == (project / "configs" / "sweep.yaml").resolve()
    assert parsed.schedules[0].args == ["--dry-run"]
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("name: b\n")
    path.write_text(f"schedules:\n  - {{name: n, cron: '0 2 * * *', config: {outside}}}\n")
    with pytest.raises(ConfigError, match="outside working_dir"):
        load_schedule_file(path)


def test_a_schedule_whose_weights_would_not_travel_with_its_job_is_refused(tmp_path):
    """The job runs in the uploaded folder: a weights file the sweep names by relative path
    must be in it, or every trial of every fire time would fail on the cluster."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sweep.yaml").write_text(
        TINY_SWEEP.replace("WEIGHTS", "pretrained/R-18.pkl")
    )
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - {name: ok, cron: '0 1 * * *', config: configs/sweep.yaml,\n"
        "     args: ['base.model.backbone.weights=/nodes/R-18.pkl']}\n"
        "  - {name: nightly, cron: '0 2 * * *', config: configs/sweep.yaml, args: [--dry-run]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_schedule_file(path)
    assert str(raised.value) == (
        f"{path}: schedules[1] (nightly) field 'config': configs/sweep.yaml: "
        "model.backbone.weights pretrained/R-18.pkl of datasets.0 (shapes) is not in the "
        f"uploaded folder {tmp_path.resolve()}: the job runs there, so its trials would fail "
        f"on the cluster. Put the file at {tmp_path.resolve() / 'pretrained' / 'R-18.pkl'}, "
        "or name one that every Ray node has by its absolute path"
    )
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "R-18.pkl").write_bytes(b"weights")
    assert [s.name for s in load_schedule_file(path).schedules] == ["ok", "nightly"]
    # A bad override in a schedule's args is found at start too.
    path.write_text(
        "schedules:\n"
        "  - {name: n, cron: '0 1 * * *', config: configs/sweep.yaml, args: [bogus.key=1]}\n"
    )
    with pytest.raises(ConfigError, match=r"schedules\[0\] \(n\) field 'config': .*bogus"):
        load_schedule_file(path)


def test_a_fire_time_is_recorded_once(tmp_path):
    history = JobHistory(tmp_path / "state.db")
    when = datetime(2026, 12, 2, 2, 0, 0, tzinfo=UTC)
    key = fire_key(when)
    assert submission_id("nightly", when) == "nightly-20261202T020000Z"
    assert not history.handled("nightly", key)
    assert history.record("nightly", key, SUBMITTED, "nightly-20261202T020000Z")
    assert history.handled("nightly", key)
    assert not history.record("nightly", key, SKIPPED, "other")  # never twice
    history.set_final_status("nightly-20261202T020000Z", "SUCCEEDED")
    again = JobHistory(tmp_path / "state.db")  # a restarted scheduler reads the same file
    (event,) = again.events()
    assert (event.action, event.job_id, event.final_status) == (
        SUBMITTED, "nightly-20261202T020000Z", "SUCCEEDED",
    )  # fmt: skip
    assert again.unfinished_submissions() == []


def jobs_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "orchestration.jobs", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**environment, **(env or {})},
    )  # fmt: skip


def test_cli_errors_are_one_line_with_an_exit_status(tmp_path):
    unreachable = jobs_cli("list", "--address", "http://127.0.0.1:9")
    assert unreachable.returncode == 1, unreachable.stderr
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    nowhere = jobs_cli("status", "x")
    assert nowhere.returncode == 2 and "pass --address" in nowhere.stderr
    bad = tmp_path / "schedules.yaml"
    bad.write_text("schedules:\n  - {name: n, cron: '61 * * * *', config: configs/demo.yaml}\n")
    refused = jobs_cli("schedule", str(bad), "--state", str(tmp_path / "s.db"))
    assert refused.returncode == 2 and "schedules[0] (n) field 'cron'" in refused.stderr
    assert "Traceback" not in refused.stderr
    no_state = jobs_cli("history", "--state", str(tmp_path / "none.db"))
    assert no_state.returncode == 2 and "no scheduler state" in no_state.stderr
