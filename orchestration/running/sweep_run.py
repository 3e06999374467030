"""One sweep from its parent run to its record: the trials on Ray, then in an order a
crash cannot make lie the leaderboard, the parent run's artifacts, the registry, the
parent run's end and the manifest's ``finished``."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoassign.errors import AutoAssignError
from orchestration.common.error_text import ray_error_reason
from orchestration.common.redaction import redact
from orchestration.definition.sweep_config import SweepConfig
from orchestration.running.locations import Locations, resolve_locations
from orchestration.running.parent_run import log_parent, parent_tags, runs_view_metrics, ui_hint
from orchestration.running.resume import sweep_record
from orchestration.running.storage import write_text_atomically
from orchestration.running.sweep_output import SweepOutput, say
from orchestration.running.sweep_record import SweepRecord
from orchestration.running.tune_run import fit_on_ray

COMPARISON = "compare.md"


PLOTS = "plots"


class SweepError(AutoAssignError):
    """The sweep ran but did not give a usable result (every trial of a dataset failed)."""


def run_sweep(
    sweep: SweepConfig,
    *,
    config_path: Path,
    sweep_id: str,
    manifest: dict[str, Any] | None = None,
    output: SweepOutput | None = None,
    trial_function: Callable[[dict[str, Any], Any], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or, given the manifest of an earlier run, resume) the sweep; returns the
    leaderboard rows.

    The record never claims more than happened: the manifest says ``finished`` only after
    the leaderboard, the parent run's artifacts and the registry are done and the parent
    run has ended; any failure on the way ends the parent run (KILLED for Ctrl-C, FAILED
    otherwise) and leaves a manifest that ``--resume`` picks up. ``trial_function``: see
    :func:`~orchestration.running.tune_run.fit_on_ray` (a benchmark's stand-in).
    """
    from orchestration.definition.search_space import describe_space
    from orchestration.tracking.retries import quiet_mlflow_output
    from orchestration.tracking.tracker import Tracker

    quiet_mlflow_output()
    where = resolve_locations(sweep)
    where.output_dir.mkdir(parents=True, exist_ok=True)
    record = sweep_record(sweep)
    resuming = manifest is not None
    tracker = Tracker(
        where.tracking_uri,
        where.experiment,
        artifact_location=None
        if where.tracking_uri.startswith("http")
        else (where.output_dir / "mlartifacts").as_uri(),
    )
    parent_run_id = tracker.parent_run(
        sweep_id, name=sweep.name, tags=parent_tags(sweep, where, config_path)
    )
    manifest = {
        "name": sweep.name,
        "sweep_id": sweep_id,
        "config": str(config_path),
        "tracking_uri": redact(where.tracking_uri),
        "experiment": where.experiment,
        "parent_run_id": parent_run_id,
        "storage_root": redact(where.storage_root),
        "storage_endpoint": redact(where.storage_endpoint),
        "status": "running",
        "trials": (manifest or {}).get("trials", {}),
        "registered": (manifest or {}).get("registered", {}),
    }
    url = None
    try:
        if not resuming:
            log_parent(tracker, parent_run_id, sweep, config_path)
        record.write_manifest(manifest)
        tracker.publish_runs_view(runs_view_metrics(sweep), list(describe_space(sweep)))
        url = tracker.runs_table_url(sweep.tracking.ui_url, with_view=True)
        say(f"sweep {sweep_id}: MLflow parent run {parent_run_id}")
        say(f"MLflow runs table: {url or ui_hint(where, tracker)}")
        results = fit_on_ray(
            sweep, where, sweep_id, parent_run_id, tracker, resuming, output, trial_function
        )
        rows = _finish(sweep, where, record, manifest, results, tracker)
    except KeyboardInterrupt:
        _end_parent(tracker, parent_run_id, "KILLED")
        manifest["status"] = "interrupted"
        record.write_manifest(manifest)
        print(
            f"sweep {sweep_id} interrupted; continue it with: python -m orchestration.sweep "
            f"{config_path} --resume",
            file=sys.stderr,
        )
        raise
    except BaseException as error:
        logging.getLogger(__name__).error("sweep %s failed", sweep_id, exc_info=error)
        reason = f"{type(error).__name__}: {ray_error_reason(error)}"[:2000]
        _end_parent(tracker, parent_run_id, "FAILED", reason=reason)
        manifest.update(status="failed", error=reason)
        with contextlib.suppress(Exception):  # the record must not hide the first error
            record.write_manifest(manifest)
        if isinstance(error, AutoAssignError):
            raise
        raise SweepError(
            f"sweep {sweep_id} failed: {reason}; finished trials are kept: once the cause is "
            f"fixed, continue with: python -m orchestration.sweep {config_path} --resume"
        ) from error
    say(f"MLflow runs table: {url or ui_hint(where, tracker)}")
    return rows


def _finish(
    sweep: SweepConfig,
    where: Locations,
    record: SweepRecord,
    manifest: dict[str, Any],
    results: Any,
    tracker: Any,
) -> list[dict[str, Any]]:
    """After the trials, in an order a crash cannot make lie: the leaderboard file, the
    parent run's artifacts, the registry, the parent run's end, and last the manifest's
    ``finished``. Each step can be done again by ``--resume`` (registered datasets are
    remembered in the manifest and not registered twice)."""
    from orchestration.results.leaderboard import build_leaderboard, format_leaderboard
    from orchestration.tracking.tags import TAG_KIND, TAG_SWEEP_ID

    sweep_id, parent_run_id = manifest["sweep_id"], manifest["parent_run_id"]
    # One read of all the sweep's trial runs (the leaderboard, the manifest and compare.md
    # all need them): at 1,000 trials it is about 100,000 params, tags and metrics, which a
    # tracking server answers faster as several searches at once (5.0 s -> 2.4 s here).
    trial_runs = tracker.find_runs(
        parts=tracker.search_parts, **{TAG_SWEEP_ID: sweep_id, TAG_KIND: "trial"}
    )
    run_of = _run_of_trial(trial_runs)
    rows = build_leaderboard(sweep, results, tracker=tracker, run_of=run_of)
    manifest["trials"] = {trial_id: run_of.get(trial_id) for trial_id in map(_trial_id_of, results)}
    manifest["status"] = "finishing"
    record.write_manifest(manifest)
    record.write_leaderboard(rows)
    tracker.log_artifact(parent_run_id, record.leaderboard_path)
    _log_comparison(tracker, where, trial_runs, parent_run_id)
    if sweep.tracking.register_models:
        _register_models(tracker, where, rows, sweep_id, record, manifest)
    say(format_leaderboard(rows))
    say(f"leaderboard: {record.leaderboard_path}")
    failed = any(row["status"] == "failed" for row in rows)
    tracker.end_run(parent_run_id, "FAILED" if failed else "FINISHED")
    manifest["status"] = "finished"
    record.write_manifest(manifest)
    return rows


def _end_parent(tracker: Any, run_id: str, status: str, *, reason: str | None = None) -> None:
    """End the parent run, or say why it could not be (``--resume`` ends it later)."""
    try:
        tracker.end_run(run_id, status, reason=reason)
    except Exception as error:  # the tracking server itself may be what failed
        print(
            f"warning: could not end the parent MLflow run {run_id} as {status} ({error}); "
            "--resume or the next run of the sweep closes it",
            file=sys.stderr,
        )


def _log_comparison(
    tracker: Any, where: Locations, trial_runs: list[Any], parent_run_id: str
) -> None:
    """``compare.md`` (the table ``python -m orchestration.compare`` prints) and the sweep's
    charts (``plots/``) from the sweep's ``trial_runs``, beside the sweep and on its parent
    run."""
    from orchestration.results.compare import markdown_table, summarize_runs
    from orchestration.results.sweep_plots import sweep_plots

    if not trial_runs:
        say("no comparison table: no trial of the sweep opened an MLflow run")
        return
    summaries = summarize_runs(trial_runs)
    path = where.output_dir / COMPARISON
    write_text_atomically(path, markdown_table(summaries))
    tracker.log_artifact(parent_run_id, path)
    for plot in sweep_plots(tracker.client, summaries, where.output_dir / PLOTS):
        tracker.log_artifact(parent_run_id, plot, PLOTS)


def _register_models(
    tracker: Any,
    where: Locations,
    rows: list,
    sweep_id: str,
    record: SweepRecord,
    manifest: dict[str, Any],
) -> None:
    """Register each dataset's winner once: a resumed finish skips the datasets the
    manifest already lists as registered."""
    from orchestration.running.storage import Storage
    from orchestration.tracking.registry import register_best

    storage = Storage(where.storage_root, where.storage_endpoint)
    done = manifest.setdefault("registered", {})
    for row in rows:
        if row["dataset"] in done:
            continue
        for registration in register_best(
            tracker.client, [row], storage=storage, sweep_id=sweep_id
        ):
            say(f"registry: {registration.model} version {registration.version}: "
                  f"{registration.comparison}")  # fmt: skip
            done[row["dataset"]] = f"{registration.model}/{registration.version}"
        record.write_manifest(manifest)


def _run_of_trial(trial_runs: list[Any]) -> dict[str, str]:
    """Each trial's MLflow run id, by trial id, from the sweep's ``trial_runs`` in any order
    (a search in parts returns them part by part): a trial's newest run wins."""
    from orchestration.tracking.tags import TAG_TRIAL_ID

    newest: dict[str, Any] = {}
    for run in trial_runs:
        trial_id = run.data.tags.get(TAG_TRIAL_ID)
        known = newest.get(trial_id)
        if trial_id is not None and (
            known is None or (run.info.start_time or 0) > (known.info.start_time or 0)
        ):
            newest[trial_id] = run
    return {trial_id: run.info.run_id for trial_id, run in newest.items()}


def _trial_id_of(result: Any) -> str:
    return Path(result.path).name
