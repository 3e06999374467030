"""Run a sweep: ``python -m orchestration.sweep CONFIG [key=value ...] [--dry-run | --resume]``.

1. The sweep file is read and checked (:mod:`orchestration.config`); datasets are looked at
   with the library's fast scan; synthetic ones are written when missing. Nothing starts
   before all of that passed.
2. A parent MLflow run is opened; one Ray Tune ``Tuner`` runs every trial of every dataset,
   with a scheduler per dataset (:mod:`orchestration.schedulers`); each trial is a Ray Train
   ``TorchTrainer`` (:mod:`orchestration.trial`, :mod:`orchestration.worker`).
3. At the end: a leaderboard (the best trial per dataset) on the terminal, in
   ``<output_dir>/leaderboard.json`` and as an artifact of the parent run.

``--resume`` finishes the sweep recorded in ``<output_dir>/manifest.json`` after its driver
died: finished trials are kept (not rerun, no second MLflow run), unfinished and errored ones
continue from their last checkpoint, and runs left RUNNING by the dead driver are closed.

Exit status: 0 done; 1 every trial of some dataset failed, or bad data; 2 bad config or
command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.errors import AutoAssignError, ConfigError, run_cli
from orchestration.config import SweepConfig, check_dataset_folders, load_sweep_config
from orchestration.error_text import ray_error_reason
from orchestration.redaction import redact, redact_data
from orchestration.storage import write_text_atomically
from orchestration.sweep_output import LOG_FILE, SweepOutput, say
from orchestration.sweep_state import LEADERBOARD, SweepLock, SweepRecord

COMPARISON = "compare.md"
PLOTS = "plots"
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
"""What each trial's Tune driver asks of Ray (bytes of logical memory)."""


class SweepError(AutoAssignError):
    """The sweep ran but did not give a usable result (every trial of a dataset failed)."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.sweep",
        description="Sweep AutoAssign over datasets and hyperparameters on Ray.",
    )
    parser.add_argument("config", type=Path, help="sweep config (YAML)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="e.g. search.num_samples=2"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and datasets, print the trial plan, start nothing",
    )
    mode.add_argument(
        "--resume",
        action="store_true",
        help="finish the sweep recorded in OUTPUT_DIR/manifest.json (after a dead driver)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Tune's and MLflow's own output too (by default it goes to "
        "OUTPUT_DIR/sweep.log)",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    sweep = load_sweep_config(args.config, args.overrides)
    check_dataset_folders(sweep, source=str(args.config))
    from orchestration import datasets

    if args.dry_run:
        scans = datasets.scan_all(sweep, write_synthetic=False, source=str(args.config))
        print(format_plan(sweep, scans, resolve_locations(sweep)))
        return
    record = sweep_record(sweep)
    # A resume that cannot work is refused before anything is written, the lock included.
    manifest = record.read_manifest() if args.resume else None
    with SweepLock(record.output_dir) as lock:
        if manifest is not None:
            manifest = record.read_manifest()  # as it is now that no other driver can write it
            adopt_recorded_storage(sweep, manifest)
            check_restorable(sweep, manifest)
        sweep_id = manifest["sweep_id"] if manifest else new_sweep_id(sweep.name)
        lock.record(sweep_id)
        make_paths_absolute(sweep)
        log_path = record.output_dir / LOG_FILE
        with SweepOutput(log_path, verbose=args.verbose) as output:
            scans = datasets.scan_all(sweep, write_synthetic=True, source=str(args.config))
            say(format_plan(sweep, scans, resolve_locations(sweep)))
            say(f"log: {log_path}" + ("" if args.verbose else " (Ray's and MLflow's output)"))
            leaderboard = run_sweep(
                sweep, config_path=args.config, sweep_id=sweep_id, manifest=manifest,
                output=output,
            )  # fmt: skip
    failed = [row["dataset"] for row in leaderboard if row["status"] == "failed"]
    if failed:
        raise SweepError(f"every trial failed for dataset(s): {', '.join(failed)}")


PATH_FIELDS = (
    "model.checkpoint",
    "model.backbone.weights",
    "eval.widerface_ground_truth",
    "data.extra_train_roots",  # a list of paths
)
"""Experiment fields that name files or folders, by dot path: in ``base`` and in overrides."""


def _absolute(value: Any, kind: type) -> Any:
    """``value`` (a path, a list of paths or None) made absolute, each path as ``kind``."""
    if isinstance(value, list):
        return [kind(Path(item).absolute()) for item in value]
    if isinstance(value, (str, Path)):
        return kind(Path(value).absolute())
    return value


def make_paths_absolute(sweep: SweepConfig) -> None:
    """Relative paths mean relative to where the sweep was started, not to a Ray worker's
    working directory: make dataset roots and weight files absolute before they travel."""
    for dataset in sweep.datasets:
        dataset.root = dataset.root.absolute()
        for key in PATH_FIELDS:  # what a recipe or an override names by path, as text
            if key in dataset.overrides:
                dataset.overrides[key] = _absolute(dataset.overrides[key], str)
    for key in PATH_FIELDS:
        *parents, name = key.split(".")
        owner = functools.reduce(getattr, parents, sweep.base)
        setattr(owner, name, _absolute(getattr(owner, name), Path))


# --------------------------------------------------------------------------------------------
# Where things go
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Locations:
    output_dir: Path
    tracking_uri: str
    experiment: str
    storage_root: str
    storage_endpoint: str | None
    ray_address: str | None


def resolve_locations(sweep: SweepConfig) -> Locations:
    """Defaults that run anywhere: SQLite MLflow, local folders, a local Ray."""
    from orchestration.storage import s3_endpoint

    output_dir = sweep.resolved_output_dir.resolve()
    tracking_uri = (
        sweep.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{output_dir / 'mlflow.db'}"
    )
    storage_root = sweep.storage.path or str(output_dir / "ray")
    return Locations(
        output_dir=output_dir,
        tracking_uri=tracking_uri,
        experiment=sweep.tracking.experiment or sweep.name,
        storage_root=storage_root.rstrip("/"),
        storage_endpoint=s3_endpoint(sweep.storage.endpoint_url),
        ray_address=sweep.ray.address or os.environ.get("RAY_ADDRESS"),
    )


def format_plan(sweep: SweepConfig, scans: dict[str, str], where: Locations) -> str:
    from orchestration.search import describe_space, trials_per_dataset

    per_dataset = trials_per_dataset(sweep)
    res = sweep.resources
    lines = [f"sweep {sweep.name}: {per_dataset * len(sweep.datasets)} trials", "datasets:"]
    for dataset in sweep.datasets:
        lines.append(
            f"  {dataset.name} ({dataset.format}, ranked by {dataset.ranking_metric}): "
            f"{per_dataset} trials; {scans[dataset.name]}"
        )
    searched = sweep.search_space or sweep.variants
    lines.append("search space:" if searched else "search space: (none)")
    for key, text in describe_space(sweep).items():
        lines.append(f"  {key}: {text}")
    lines += [
        f"search: {sweep.search.algorithm}, {sweep.search.num_samples} sample(s) per grid "
        f"point, scheduler {sweep.search.scheduler.type}",
        f"resources per trial: {res.workers_per_trial} worker(s) x ({res.cpus_per_worker:g} CPU"
        f", {res.gpus_per_worker:g} GPU)",
        f"max concurrent trials: {sweep.search.max_concurrent_trials or 'from the cluster'}",
        f"storage: {redact(where.storage_root)}"
        + (f" (endpoint {where.storage_endpoint})" if where.storage_endpoint else ""),
        f"tracking: {redact(where.tracking_uri)} (experiment {where.experiment!r})",
        f"ray: {redact(where.ray_address) or 'a local Ray started for the sweep'}",
        f"output: {where.output_dir}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def sweep_record(sweep: SweepConfig) -> SweepRecord:
    """The sweep's manifest and leaderboard: in its output folder, and in its storage too
    when the user chose one (``storage.path``), which outlives a Ray Job's head node."""
    from orchestration.storage import Storage, s3_endpoint

    shared = None
    if sweep.storage.path is not None:
        shared = Storage(sweep.storage.path.rstrip("/"), s3_endpoint(sweep.storage.endpoint_url))
    return SweepRecord(sweep.name, sweep.resolved_output_dir.resolve(), shared)


def adopt_recorded_storage(sweep: SweepConfig, manifest: dict[str, Any]) -> None:
    """Resume where the sweep keeps its Ray state: the manifest's storage root.

    A config that leaves ``storage.path`` at its default takes the recorded one (with its
    endpoint); one that names another storage is refused, since Ray Tune's state of the
    sweep is not there and a fresh start would rerun finished trials under the same id.
    """
    recorded = manifest.get("storage_root")
    if not recorded:
        return
    current = resolve_locations(sweep).storage_root
    if current == recorded.rstrip("/"):
        return
    if sweep.storage.path is None and "***" not in recorded:
        sweep.storage.path = recorded
        if sweep.storage.endpoint_url is None and manifest.get("storage_endpoint"):
            sweep.storage.endpoint_url = manifest["storage_endpoint"]
        print(f"resuming with the storage the sweep ran with: {recorded}")
        return
    raise ConfigError(
        f"--resume: sweep {manifest['sweep_id']} keeps its Ray state in {recorded} "
        f"(storage_root of its manifest), but storage.path is now {redact(current)}; "
        f"resume with storage.path={recorded}"
    )


def check_restorable(sweep: SweepConfig, manifest: dict[str, Any]) -> None:
    """ConfigError unless Ray Tune's state of the manifest's sweep is in the storage."""
    from ray import tune

    from orchestration.storage import Storage

    where = resolve_locations(sweep)
    if manifest.get("status") == "finished":
        raise ConfigError(
            f"--resume: sweep {manifest['sweep_id']} has already finished; its leaderboard is "
            f"{where.output_dir / LEADERBOARD}"
        )
    storage_path, filesystem = Storage(where.storage_root, where.storage_endpoint).ray_storage()
    experiment = f"{storage_path}/{manifest['sweep_id']}"
    try:
        restorable = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    except OSError as error:
        raise ConfigError(f"--resume: cannot read {redact(where.storage_root)}: {error}") from None
    if not restorable:
        raise ConfigError(
            f"--resume: sweep {manifest['sweep_id']} has no Ray Tune state under "
            f"{redact(where.storage_root)}/{manifest['sweep_id']} (the driver died before "
            "Tune saved any, or the storage was emptied); nothing can be resumed: run the "
            "sweep again without --resume"
        )


def new_sweep_id(name: str) -> str:
    """Unique per run of a sweep, so a rerun never overwrites Ray's state of an earlier one."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_sweep(
    sweep: SweepConfig,
    *,
    config_path: Path,
    sweep_id: str,
    manifest: dict[str, Any] | None = None,
    output: SweepOutput | None = None,
) -> list[dict[str, Any]]:
    """Run (or, given the manifest of an earlier run, resume) the sweep; returns the
    leaderboard rows.

    The record never claims more than happened: the manifest says ``finished`` only after
    the leaderboard, the parent run's artifacts and the registry are done and the parent
    run has ended; any failure on the way ends the parent run (KILLED for Ctrl-C, FAILED
    otherwise) and leaves a manifest that ``--resume`` picks up.
    """
    from orchestration.search import describe_space
    from orchestration.tracking import Tracker, quiet_mlflow_output

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
            _log_parent(tracker, parent_run_id, sweep, config_path)
        record.write_manifest(manifest)
        tracker.publish_runs_view(runs_view_metrics(sweep), list(describe_space(sweep)))
        url = tracker.runs_table_url(sweep.tracking.ui_url, with_view=True)
        say(f"sweep {sweep_id}: MLflow parent run {parent_run_id}")
        say(f"MLflow runs table: {url or ui_hint(where, tracker)}")
        results = _fit_on_ray(sweep, where, sweep_id, parent_run_id, tracker, resuming, output)
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


def _fit_on_ray(
    sweep: SweepConfig,
    where: Locations,
    sweep_id: str,
    parent_run_id: str,
    tracker: Any,
    resuming: bool,
    output: SweepOutput | None = None,
) -> Any:
    """Every trial, on a Ray started (or joined) for the purpose; KeyboardInterrupt when
    Ctrl-C stopped Tune."""
    import ray

    verbose = output is None or output.verbose
    _init_ray(where, configure_logging=verbose)
    if output is not None:
        output.route_ray_processes()
    try:
        with ctrl_c_watch() as interrupted:
            results = _fit(sweep, where, sweep_id, parent_run_id, tracker, resuming, verbose)
    finally:
        ray.shutdown()
    if interrupted():
        raise KeyboardInterrupt
    return results


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
    from orchestration.leaderboard import build_leaderboard, format_leaderboard

    sweep_id, parent_run_id = manifest["sweep_id"], manifest["parent_run_id"]
    rows = build_leaderboard(sweep, results, tracker=tracker, sweep_id=sweep_id)
    manifest["trials"] = {
        row["trial_id"]: row["run_id"] for row in _all_trials(results, tracker, sweep_id)
    }
    manifest["status"] = "finishing"
    record.write_manifest(manifest)
    record.write_leaderboard(rows)
    tracker.log_artifact(parent_run_id, record.leaderboard_path)
    _log_comparison(tracker, where, sweep_id, parent_run_id)
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


def _log_comparison(tracker: Any, where: Locations, sweep_id: str, parent_run_id: str) -> None:
    """``compare.md`` (the table ``python -m orchestration.compare`` prints) and the sweep's
    charts (``plots/``), beside the sweep and on its parent run."""
    from orchestration.compare import CompareError, load_trials, markdown_table
    from orchestration.sweep_plots import sweep_plots

    try:
        _, summaries = load_trials(tracker.client, where.experiment, sweep_id=sweep_id)
    except CompareError as error:  # no trial ever opened a run
        say(f"no comparison table: {error}")
        return
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
    from orchestration.registry import register_best
    from orchestration.storage import Storage

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


def _init_ray(where: Locations, *, configure_logging: bool = True) -> None:
    """Start or join Ray; ``configure_logging=False`` leaves Ray's driver logger without a
    terminal handler of its own (its records then reach the sweep's log file)."""
    import ray

    options: dict[str, Any] = {"log_to_driver": True, "configure_logging": configure_logging}
    if where.ray_address:
        ray.init(address=where.ray_address, **options)
    else:
        ray.init(include_dashboard=False, **options)


def _fit(
    sweep: SweepConfig,
    where: Locations,
    sweep_id: str,
    parent_run_id: str,
    tracker: Any,
    resuming: bool,
    verbose: bool = True,
) -> Any:
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestration.run_closing import RunCloser
    from orchestration.schedulers import TUNE_ENV, build_scheduler
    from orchestration.search import param_space
    from orchestration.storage import Storage
    from orchestration.trial import (
        SweepContext,
        run_trial,
        trial_failure_config,
        trial_label,
        trial_params,
    )

    os.environ.update(TUNE_ENV)  # epochs without an evaluation report no score
    storage = Storage(where.storage_root, where.storage_endpoint)
    storage_path, filesystem = storage.ray_storage()
    context = SweepContext(
        sweep=sweep.model_dump(mode="json"),
        sweep_id=sweep_id,
        parent_run_id=parent_run_id,
        tracking_uri=where.tracking_uri,
        storage_root=where.storage_root,
        storage_endpoint=where.storage_endpoint,
        work_dir=str(where.output_dir / "trials"),
    )
    # The trial driver holds no CPU, so the Train workers can take all of them; Ray refuses
    # an empty request, hence a token amount of (logical) memory.
    trainable = tune.with_parameters(
        tune.with_resources(run_trial, DRIVER_RESOURCES), context=context
    )
    run_config = tune.RunConfig(
        name=sweep_id,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[RunCloser(tracker, sweep_id), trial_progress(sweep)],
        failure_config=trial_failure_config(sweep),
        verbose=1 if verbose else 0,  # 1: Tune's trial table every 30 s
    )
    experiment_path = f"{storage_path}/{sweep_id}"
    if resuming:  # check_restorable made sure Tune's state is there
        closed = tracker.close_stale_runs(sweep_id, keep=[])
        if closed:
            say(f"closed {len(closed)} run(s) left RUNNING by the previous driver")
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
        return tuner.fit()
    max_epochs, _ = sweep.base.train.resolved_schedule()
    concurrent = max_concurrent_trials(sweep, ray.cluster_resources())
    if sweep.search.algorithm == "tpe":
        from orchestration.search import trials_per_dataset
        from orchestration.tpe import tpe_searcher

        # The searcher hands out every trial's whole config, so Tune gets no space of its own.
        space, num_samples = {}, trials_per_dataset(sweep) * len(sweep.datasets)
        search_alg = tpe_searcher(sweep, max_concurrent=concurrent)
    else:
        space, num_samples = param_space(sweep), sweep.search.num_samples
        # The limit must sit on the generator itself: Tune does not wrap one given to it.
        search_alg = BasicVariantGenerator(
            random_state=sweep.search.seed, max_concurrent=concurrent
        )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            scheduler=build_scheduler(sweep.search.scheduler, max_epochs=max_epochs),
            search_alg=search_alg,
            num_samples=num_samples,
            trial_name_creator=lambda t: trial_label(t.config["dataset"], trial_params(t.config)),
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=run_config,
    )
    return tuner.fit()


def trial_progress(sweep: SweepConfig) -> Any:
    """The Tune callback printing each trial's epochs and end (see :mod:`sweep_output`)."""
    from orchestration.config import trial_experiment
    from orchestration.search import trials_per_dataset
    from orchestration.trial import DATASET_KEY, trial_params
    from orchestration.trial_progress import TrialProgress

    by_name = {dataset.name: dataset for dataset in sweep.datasets}

    def epochs_of(tune_config: dict[str, Any]) -> int:
        dataset = by_name[tune_config[DATASET_KEY]]
        experiment = trial_experiment(sweep, dataset, trial_params(tune_config))
        return experiment.train.resolved_schedule()[0]

    return TrialProgress(
        {dataset.name: dataset.ranking_metric for dataset in sweep.datasets},
        epochs_of,
        trials_total=trials_per_dataset(sweep) * len(sweep.datasets),
    )


@contextlib.contextmanager
def ctrl_c_watch():
    """Tell afterwards whether Ctrl-C stopped the Ray Tune run inside the block.

    Tune catches the first SIGINT itself: it stops every trial cleanly (they end TERMINATED,
    as if they had finished), saves its state, puts back the handler it found and returns.
    So this installs a handler of its own first; finding it back in place afterwards means
    Tune received the signal. A second Ctrl-C reaches it and interrupts at once. Yields a
    function that answers after the block.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nohup, background jobs
    if ignored or threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals reach the main thread only
        return
    previous = signal.signal(signal.SIGINT, handler)
    seen: list[bool] = []
    try:
        yield lambda: bool(seen and seen[0])
    finally:
        seen.append(signal.getsignal(signal.SIGINT) is handler)
        signal.signal(signal.SIGINT, previous)


def max_concurrent_trials(sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """Trials whose workers all fit on the cluster at once (at least 1), or the config's."""
    if sweep.search.max_concurrent_trials is not None:
        return sweep.search.max_concurrent_trials
    res = sweep.resources
    fits = [cluster.get("CPU", 1.0) // (res.cpus_per_worker * res.workers_per_trial)]
    if res.use_gpu:
        fits.append(cluster.get("GPU", 0.0) // (res.gpus_per_worker * res.workers_per_trial))
    return max(1, int(min(fits)))


def _all_trials(results: Any, tracker: Any, sweep_id: str) -> list[dict[str, str]]:
    from orchestration.tracking import TAG_SWEEP_ID, TAG_TRIAL_ID

    rows = []
    for result in results:
        trial_id = _trial_id_of(result)
        runs = tracker.find_runs(**{TAG_SWEEP_ID: sweep_id, TAG_TRIAL_ID: trial_id})
        rows.append({"trial_id": trial_id, "run_id": runs[0].info.run_id if runs else None})
    return rows


def _trial_id_of(result: Any) -> str:
    return Path(result.path).name


# --------------------------------------------------------------------------------------------
# The parent run
# --------------------------------------------------------------------------------------------


def parent_tags(sweep: SweepConfig, where: Locations, config_path: Path) -> dict[str, str]:

    tags = {
        "autoassign.config_file": str(config_path),
        "autoassign.storage": redact(where.storage_root) or "",
        "autoassign.datasets": ",".join(d.name for d in sweep.datasets),
        "python": platform.python_version(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# The columns the runs table opens with, per protocol (all of them are still logged).
VIEW_METRICS = {
    "coco": ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"),
    "objects365": ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"),
    "voc": ("mAP",),
    "widerface": ("AP_easy", "AP_medium", "AP_hard"),
}


def runs_view_metrics(sweep: SweepConfig) -> list[str]:
    """Each dataset's ranking metric and its protocol's headline metrics, once each."""
    metrics: list[str] = []
    for dataset in sweep.datasets:
        metrics += [dataset.ranking_metric, *VIEW_METRICS[dataset.format]]
    return list(dict.fromkeys(metrics))


def _log_parent(tracker: Any, run_id: str, sweep: SweepConfig, config_path: Path) -> None:
    import tempfile

    from orchestration.search import describe_space, trials_per_dataset

    params = {f"search_space.{k}": v for k, v in describe_space(sweep).items()}
    params.update({f"variants.{name}": json.dumps(v) for name, v in sweep.variants.items()})
    params.update(
        {
            "search.algorithm": sweep.search.algorithm,
            "search.num_samples": sweep.search.num_samples,
            "search.scheduler": sweep.search.scheduler.type,
            "trials_per_dataset": trials_per_dataset(sweep),
            "resources.workers_per_trial": sweep.resources.workers_per_trial,
        }
    )
    params.update({f"versions.{name}": version for name, version in package_versions().items()})
    tracker.log_params(run_id, params)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "sweep_resolved.yaml"
        resolved.write_text(redacted_yaml(sweep.model_dump(mode="json")), encoding="utf-8")
        tracker.log_artifact(run_id, resolved)
        if config_path.is_file():
            tracker.log_artifact(run_id, redacted_copy(config_path, Path(tmp) / "config"))


def redacted_yaml(data: Any) -> str:
    """``data`` as YAML with its URIs' credentials and secret-named values hidden."""
    import yaml

    return yaml.safe_dump(redact_data(data), sort_keys=False)


def redacted_copy(config_path: Path, folder: Path) -> Path:
    """The user's config file as it is, or, when it holds a secret, its redacted YAML
    (comments are lost then, a header says so), under the same name in ``folder``."""
    import yaml

    text = config_path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    copy = folder / config_path.name
    folder.mkdir(parents=True, exist_ok=True)
    if redact_data(data) == data:
        copy.write_text(text, encoding="utf-8")
    else:
        header = "# secrets (URI credentials, query strings, secret-named values) removed\n"
        copy.write_text(header + redacted_yaml(data), encoding="utf-8")
    return copy


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("autoassign-ray", "torch", "torchvision", "ray", "mlflow", "pycocotools"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(where: Locations, tracker: Any) -> str:
    url = tracker.runs_table_url("http://127.0.0.1:5000", with_view=True)
    store = redact(where.tracking_uri)
    return f"run `mlflow ui --backend-store-uri {store} --port 5000`, then open {url}"


if __name__ == "__main__":
    sys.exit(main())
