"""The sweep command: ``python -m orchestration.sweep CONFIG [key=value ...] [--dry-run |
--resume] [--verbose]``.

1. The sweep file is read and checked (:mod:`orchestration.definition.sweep_config`);
   datasets are looked at with the library's fast scan; synthetic ones are written when
   missing. Nothing starts before all of that passed.
2. :func:`orchestration.running.sweep_run.run_sweep` opens a parent MLflow run and runs
   every trial of every dataset in one Ray Tune ``Tuner``
   (:mod:`orchestration.running.tune_run`); each trial is a Ray Train ``TorchTrainer``, or
   its one worker trains in the trial's own process (``resources.runner: trial``)
   (:mod:`orchestration.running.trial`, :mod:`orchestration.running.worker`).
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
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoassign.errors import run_cli
from autoassign.weight_names import is_weights_name
from orchestration.definition.config_checks import check_dataset_folders
from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.sweep_config import SweepConfig
from orchestration.running.locations import format_plan, resolve_locations
from orchestration.running.resume import (
    adopt_recorded_storage,
    check_restorable,
    new_sweep_id,
    sweep_record,
)
from orchestration.running.sweep_output import LOG_FILE, SweepOutput, say
from orchestration.running.sweep_record import SweepLock
from orchestration.running.sweep_run import SweepError, run_sweep


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


def run(args: argparse.Namespace, *, trial_function: Any = None) -> None:
    """The sweep ``args`` asks for (``trial_function``: a benchmark's stand-in for the
    training, see :func:`~orchestration.running.tune_run.fit_on_ray`)."""
    sweep = load_sweep_config(args.config, args.overrides)
    check_dataset_folders(sweep, source=str(args.config))
    from orchestration.definition import dataset_scans as datasets

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
                output=output, trial_function=trial_function,
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
    """``value`` (a path, a list of paths or None) made absolute, each path as ``kind``;
    named ImageNet weights (``msra:R-50``) are no path and stay as they are."""
    if is_weights_name(value):
        return value
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


if __name__ == "__main__":
    sys.exit(main())
