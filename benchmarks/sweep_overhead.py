"""What the platform adds to the demo's training: a sweep against the same trials as plain runs.

    python benchmarks/sweep_overhead.py [CONFIG] [key.path=value ...] [--datasets coco voc]

First ``python -m orchestration.sweep CONFIG`` runs as a user runs it (a fresh process with
its own local Ray, MLflow in its SQLite file). Then every trial it trained runs again as a
plain library run, ``python -m autoassign.train`` on the resolved config the trial's rank 0
wrote (``trials/<trial id>/config.yaml``: the same model, data, schedule and seed), with no
Ray and no MLflow, as many at a time as the sweep ran at once and with the threads a Ray
worker of ``resources.cpus_per_worker`` CPUs gets.

Both sides write ``metrics.jsonl``, whose records carry their wall time, so each trial's time
splits the same way on both:

- setup: from the trial's start (the sweep: its MLflow run opened by the trial driver; the
  library: the process launched) to the start of training (for the sweep: the Train
  controller, the worker group and its process group, then the engine's datasets and model);
- training: the steps (for the sweep with its per-epoch reports);
- eval + checkpoint: from each evaluated epoch's last step to its record;
- end: from the last record to the trial's end (for the sweep: the checkpoint upload to
  Ray's storage, the run's artifacts, the worker group's teardown, the run's end).

The sweep's own time before its first trial (Ray's start, config checks and dataset scans,
the parent run) and after its last (leaderboard, registry, plots) is printed too, and each
trial's ranking metric on both sides (the same configs and seeds give the same AP).

On Linux it also prints the CPU time each kind of process took on each side (every
process's, from ``/proc``, see ``process_cpu.py``), in all and per trial: the processes that
train (the Train workers, or the trial processes under ``resources.runner: trial``) against
the library runs, and what else the sweep's trials cost (Ray Train's controller and
synchronization actor, the queue carrying its reports to Tune, the trial drivers, Ray's
daemons). On two cores that CPU comes out of the training beside it. Compare the two
runners with ``resources.runner=ray_train`` (the demo's is ``trial``).
Last line: ``sweep_overhead: sweep S s, library L s, ratio R``.

``--datasets`` keeps only the named datasets of the sweep (a shorter measurement); overrides
are applied to the sweep and so reach both sides, e.g. ``base.train.epochs=4
base.train.milestones=[3]``. Synthetic datasets are written before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from orchestration.definition.sweep_config import SweepConfig
    from orchestration.running.locations import Locations

from process_cpu import cpu_sampler, print_cpu  # beside this file

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("setup", "training", "eval + checkpoint", "end")


@dataclass
class TrialTime:
    """One trial's wall clock (seconds since the Unix epoch) and where its time went."""

    name: str  # the trial id: its folder under trials/
    started: float
    ended: float
    phases: dict[str, float]
    metric: float | None
    metric_name: str
    label: str = ""

    @property
    def wall(self) -> float:
        return self.ended - self.started


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def split_time(name: str, started: float, ended: float, records: list[dict], metric_name: str):
    """A trial's phases from its ``metrics.jsonl`` records and its start and end."""
    starts = [r["time"] for r in records if r["type"] == "start"]
    evals = [r for r in records if r["type"] == "eval"]
    if not starts or not evals:
        raise RuntimeError(f"{name}: metrics.jsonl has no start or no evaluation record")
    training_start, last_record = starts[0], records[-1]["time"]
    eval_seconds = sum(r["eval_and_checkpoint_seconds"] for r in evals)
    phases = {
        "setup": training_start - started,
        "training": last_record - training_start - eval_seconds,
        "eval + checkpoint": eval_seconds,
        "end": ended - last_record,
    }
    return TrialTime(name, started, ended, phases, evals[-1].get(metric_name), metric_name)


# ---- the sweep ---------------------------------------------------------------------------------


def prepare_sweep_file(config: Path, datasets: list[str] | None, folder: Path) -> Path:
    """The sweep file to run: ``config`` itself, or a copy with only ``datasets``."""
    if not datasets:
        return config
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    known = [entry["name"] for entry in data["datasets"]]
    missing = sorted(set(datasets) - set(known))
    if missing:
        raise SystemExit(f"--datasets: {missing} not in {config} (it has {known})")
    data["datasets"] = [entry for entry in data["datasets"] if entry["name"] in datasets]
    copy = folder / config.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return copy


def write_datasets(sweep: SweepConfig) -> None:
    from orchestration.definition.dataset_scans import write_synthetic_if_missing

    for dataset in sweep.datasets:
        write_synthetic_if_missing(dataset)


def run_sweep(sweep_file: Path, overrides: list[str], log: Path) -> tuple[float, float]:
    """Run the sweep to its end; its launch and exit times."""
    command = [sys.executable, "-m", "orchestration.sweep", str(sweep_file), *overrides]
    print(f"sweep: {' '.join(command[1:])} (terminal output in {log})", flush=True)
    started = time.time()
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    ended = time.time()
    if code != 0:
        raise SystemExit(f"the sweep exited {code}; see {log}")
    return started, ended


def sweep_trials(where: Locations) -> list[TrialTime]:
    """Each trial's times: its MLflow run's start and end, its rank 0's metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.tags import TAG_KIND, TAG_METRIC, TAG_TRIAL_ID

    client = MlflowClient(where.tracking_uri)
    experiment = client.get_experiment_by_name(where.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'trial'", max_results=1000
    )
    trials = []
    for run in runs:
        trial_id = run.data.tags[TAG_TRIAL_ID]
        records = read_records(where.output_dir / "trials" / trial_id / "metrics.jsonl")
        trial = split_time(
            trial_id,
            run.info.start_time / 1000,
            run.info.end_time / 1000,
            records,
            run.data.tags[TAG_METRIC],
        )
        trial.label = run.info.run_name
        trials.append(trial)
    return sorted(trials, key=lambda trial: trial.name)


def most_at_once(trials: list[TrialTime]) -> int:
    """The most trials that ran at the same moment."""
    events = sorted([(t.started, 1) for t in trials] + [(t.ended, -1) for t in trials])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


# ---- the same trials as library runs -----------------------------------------------------------


def run_library(trial: TrialTime, sweep_output: Path, folder: Path, threads: int) -> TrialTime:
    config = sweep_output / "trials" / trial.name / "config.yaml"
    output = folder / trial.name
    command = [sys.executable, "-m", "autoassign.train", str(config), f"output_dir={output}"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    with (folder / f"{trial.name}.log").open("w", encoding="utf-8") as handle:
        code = subprocess.call(
            command, cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT
        )
    ended = time.time()
    if code != 0:
        raise RuntimeError(f"library run of {trial.name} exited {code}; see {handle.name}")
    records = read_records(output / "metrics.jsonl")
    return split_time(trial.name, started, ended, records, trial.metric_name)


def run_all_library(
    trials: list[TrialTime], sweep_output: Path, folder: Path, *, at_once: int, threads: int
) -> tuple[list[TrialTime], float]:
    """Every trial as a library run, ``at_once`` at a time; their times and the wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(run_library, t, sweep_output, folder, threads) for t in trials]
        results = [future.result() for future in futures]
    return results, time.time() - started


# ---- report ------------------------------------------------------------------------------------


def print_phases(label: str, trials: list[TrialTime]) -> None:
    means = {phase: statistics.mean(t.phases[phase] for t in trials) for phase in PHASES}
    wall = statistics.mean(t.wall for t in trials)
    parts = ", ".join(f"{phase} {seconds:6.1f} s" for phase, seconds in means.items())
    print(f"{label:>8} per trial: wall {wall:6.1f} s = {parts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    parser.add_argument("--datasets", nargs="+", help="keep only these datasets of the sweep")
    parser.add_argument("--keep", type=Path, help="leave both sides' files in this folder")
    args = parser.parse_args(argv)

    from orchestration.definition.config_loading import load_sweep_config
    from orchestration.running.locations import resolve_locations

    config = args.config.resolve()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep.resolve() if args.keep else Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        sweep_file = prepare_sweep_file(config, args.datasets, folder)
        overrides = [*args.overrides, f"output_dir={folder / 'sweep'}"]
        sweep = load_sweep_config(sweep_file, overrides)
        where = resolve_locations(sweep)  # as the sweep's own process finds them
        write_datasets(sweep)

        with cpu_sampler() as sweep_cpu:
            launched, exited = run_sweep(sweep_file, overrides, folder / "sweep.txt")
        sweep_seconds = exited - launched
        trials = sweep_trials(where)
        at_once = most_at_once(trials)
        threads = max(1, int(sweep.resources.cpus_per_worker))
        print(f"sweep: {len(trials)} trials, at most {at_once} at once, {sweep_seconds:.1f} s")

        with cpu_sampler() as library_cpu:
            library, library_seconds = run_all_library(
                trials, where.output_dir, folder / "library", at_once=at_once, threads=threads
            )
        print(f"library: {len(library)} runs, {at_once} at a time, {library_seconds:.1f} s")

        print_phases("sweep", trials)
        print_phases("library", library)
        first_start = min(t.started for t in trials)
        last_end = max(t.ended for t in trials)
        print(
            f"   sweep before its first trial {first_start - launched:.1f} s (Ray, checks, "
            f"parent run), after its last {exited - last_end:.1f} s (leaderboard, registry, "
            "plots)"
        )
        print_cpu("sweep", sweep_cpu, len(trials))
        print_cpu("library", library_cpu, len(library))
        for ours, plain in zip(trials, library):
            print(
                f"  {ours.label}: {ours.metric_name} sweep {ours.metric:.3f} "
                f"library {plain.metric:.3f}, wall {ours.wall:.1f} s against {plain.wall:.1f} s"
            )
        ratio = sweep_seconds / library_seconds
        print(
            f"sweep_overhead: sweep {sweep_seconds:.1f} s, library {library_seconds:.1f} s, "
            f"ratio {ratio:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
