"""A sweep of many trials through the project's real machinery, against plain Ray Tune.

    python benchmarks/sweep_scale.py --trials 1000 [--epochs 10] [--tracking sqlite postgres]

Everything of the sweep runs as a user's sweep does (``orchestration.running.cli.run``: the
config checks and dataset scans, the folder lock, the per-dataset schedulers and searcher,
trial naming, the MLflow parent run and one child run per trial with all its params, the
per-epoch metrics through the same metric buffer (sent every ``tracking.flush_every_s``, as a
real trial's are), the run closing callback, the terminal's
lines, the leaderboard, ``compare.md``, the plots) except the training: each trial runs
:func:`stand_in_trial`, which opens its MLflow run as a real trial does and then reports E
epochs of made-up metrics with a short sleep (``--epoch-seconds``). The peer is plain Ray
Tune running the same sleep-and-report loop, the same number of trials at a time, with no
tracking at all. The registry is off (a stand-in trial has no weights to register); the
scheduler is FIFO in both, so both do the same work.

Tracking goes to a real ``mlflow server`` on PostgreSQL (started here, on 127.0.0.1, as the
integration tests start it; needs PostgreSQL 15's binaries) and to the embedded default, a
SQLite file; ``postgres-access-log`` is the same server with uvicorn's access log, which the
stack leaves off, and ``postgres-gunicorn`` the same under gunicorn instead of MLflow's default
uvicorn. Each measured run is a fresh process, so its peak memory is its own.

Printed per tracking store: both wall times and their ratio, the overhead per trial, where a
trial's time went (opening its run, its epochs against plain Tune's, closing its run), the
driver's peak memory, how long the sweep's end took (leaderboard, compare.md, plots) and
``python -m orchestration.compare`` on the result; with ``--cpu``, the CPU each kind of
process took in each run (``process_cpu.py``). Last line, for the last store named in
``--tracking``: ``sweep_scale: N trials, project P s, tune T s, ratio R, end E s, compare C s``.

This machine's runs of the same code differ by 0.04-0.06 in ratio. ``--repeat K`` measures K
rounds, each with its own plain-Tune run and the stores taking turns at going first, and
prints each store's median; the last line then holds medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from process_cpu import cpu_sampler, print_cpu  # beside this file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' helpers: the compose file's server, the UI
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
FORMATS = ("coco", "voc", "objects365", "widerface")


# ---- what each trial runs ---------------------------------------------------------------------


def made_up_epoch(trial_seed: str, epoch: int, epochs: int) -> dict[str, float]:
    """One epoch's losses and metrics, the same for the same trial and epoch: a loss that
    falls and a ranking metric that rises towards the trial's own ceiling."""
    ceiling = random.Random(trial_seed).uniform(0.2, 0.6)
    progress = epoch / epochs
    return {"loss": 2.0 / (1 + 3 * progress), "metric": ceiling * progress}


def stand_in_trial(tune_config: dict[str, Any], context: Any) -> None:
    """What a trial runs here instead of Ray Train: the trial's real MLflow run (opened as
    :func:`orchestration.running.trial.run_trial` opens it, with every param), ``epochs``
    reports of made-up metrics logged through the real metric buffer, the run's end."""
    import ray.tune

    from orchestration.definition.sweep_config import KNOWN_METRICS
    from orchestration.definition.trial_experiments import trial_experiment
    from orchestration.definition.trial_names import DATASET_KEY, trial_params
    from orchestration.running.trial import open_trial_run
    from orchestration.tracking.metric_buffer import MetricBuffer

    started = time.perf_counter()
    sweep = context.sweep_config()
    dataset = sweep.dataset(tune_config[DATASET_KEY])
    params = trial_params(tune_config)
    trial_id = ray.tune.get_context().get_trial_id()
    experiment = trial_experiment(sweep, dataset, params, output_dir=Path(context.work_dir))
    tracker, run_id = open_trial_run(
        context, sweep, trial_id=trial_id, dataset=dataset, params=params, experiment=experiment
    )
    buffer = MetricBuffer(tracker.client, run_id, flush_every_s=sweep.tracking.flush_every_s)
    epochs = experiment.train.resolved_schedule()[0]
    pause = float(os.environ["SWEEP_SCALE_EPOCH_S"])
    opened = time.perf_counter()
    for epoch in range(1, epochs + 1):
        time.sleep(pause)
        made_up = made_up_epoch(json.dumps(params, sort_keys=True), epoch, epochs)
        metrics = {name: made_up["metric"] for name in KNOWN_METRICS[dataset.format]}
        step = epoch * 100
        buffer.add(
            {
                "train/loss": made_up["loss"],
                "lr": experiment.train.lr,
                "epoch/train_loss": made_up["loss"],
                "epoch": float(epoch),
                **metrics,
            },
            step=step,
        )
        buffer.flush_if_due()
        ray.tune.report(
            {
                "epoch": epoch,
                "iteration": step,
                "train/loss": made_up["loss"],
                "score": metrics[dataset.ranking_metric],
                **metrics,
            }
        )
    trained = time.perf_counter()
    buffer.close(timeout=60)
    tracker.end_run(run_id, "FINISHED")
    ended = time.perf_counter()
    record_phases(start=opened - started, epochs=trained - opened, end=ended - trained)


def plain_tune_trial(config: dict[str, Any]) -> None:
    """The peer's trial: the same sleeps and reports, nothing tracked."""
    import ray.tune

    pause = float(os.environ["SWEEP_SCALE_EPOCH_S"])
    epochs = config["epochs"]
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        time.sleep(pause)
        made_up = made_up_epoch(json.dumps(config, sort_keys=True), epoch, epochs)
        ray.tune.report({"epoch": epoch, "train/loss": made_up["loss"], "score": made_up["metric"]})
    record_phases(start=0.0, epochs=time.perf_counter() - started, end=0.0)


PHASES = ("start", "epochs", "end")
"""A trial's parts, in seconds: opening its MLflow run (with building its configs), its epochs
(the sleeps, and each report's wait for Tune's driver), closing its run."""


def record_phases(**seconds: float) -> None:
    """Append this trial's :data:`PHASES` to its process's file in ``SWEEP_SCALE_PHASES``."""
    folder = Path(os.environ["SWEEP_SCALE_PHASES"])
    with (folder / f"{os.getpid()}.jsonl").open("a") as handle:
        handle.write(json.dumps(seconds) + "\n")


def mean_phases(folder: Path) -> dict[str, float]:
    """Each phase's mean over the trials that :func:`record_phases` wrote into ``folder``."""
    rows = [json.loads(line) for path in folder.glob("*.jsonl") for line in path.open()]
    return {phase: sum(row[phase] for row in rows) / max(1, len(rows)) for phase in PHASES}


# ---- one measured run (a child process) -------------------------------------------------------


def sweep_file(folder: Path, trials: int, epochs: int, concurrent: int, tracking_uri: str) -> Path:
    import yaml

    per_dataset = max(1, trials // len(FORMATS))
    datasets = []
    for format_ in FORMATS:
        entry: dict[str, Any] = {
            "name": f"{format_}-synthetic",
            "format": format_,
            "root": str(folder / "data" / format_),
            "num_classes": 2 if format_ != "voc" else 20,
            "synthetic": {"images": 4, "image_size": 64},
        }
        if format_ in ("coco", "objects365"):
            entry["synthetic"]["num_classes"] = 2
        if format_ == "widerface":
            entry["num_classes"] = entry["synthetic"]["num_classes"] = 1
        datasets.append(entry)
    config = {
        "name": "sweep-scale",
        "base": {
            "model": {"backbone": {"depth": 18, "weights": None}},
            "train": {"lr": 0.01, "schedule": None, "epochs": epochs, "milestones": [epochs]},
            "eval": {"every_epochs": 1},
            "device": "cpu",
        },
        "datasets": datasets,
        "search_space": {
            "train.lr": {"loguniform": [1.0e-4, 1.0e-1]},
            "model.center_prior.sigma_init": {"uniform": [0.5, 2.0]},
        },
        "search": {
            "algorithm": "random",
            "num_samples": per_dataset,
            "max_concurrent_trials": concurrent,
            "scheduler": {"type": "fifo"},
        },
        "tracking": {"uri": tracking_uri, "register_models": False},
        "storage": {"path": str(folder / "ray")},
        "output_dir": str(folder / "sweep"),
    }
    path = folder / "sweep_scale.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure_project(folder: Path, trials: int, epochs: int, concurrent: int, uri: str) -> dict:
    """The project's sweep with :func:`stand_in_trial`, timed, in this process."""
    from orchestration.running import cli, sweep_run

    finish = sweep_run._finish
    timings: dict[str, float] = {}

    def timed_finish(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return finish(*args, **kwargs)
        finally:
            timings["end_s"] = time.perf_counter() - started

    sweep_run._finish = timed_finish  # the sweep's end: leaderboard, compare.md, plots
    config = sweep_file(folder, trials, epochs, concurrent, uri)
    args = cli.parse_args([str(config)])
    started = time.perf_counter()
    cli.run(args, trial_function=stand_in_trial)
    wall = time.perf_counter() - started
    leaderboard = json.loads((folder / "sweep" / "leaderboard.json").read_text())
    return {
        "wall_s": wall,
        "end_s": timings.get("end_s", float("nan")),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trials_on_leaderboard": sum(row["trials"] for row in leaderboard),
    }


def measure_tune(trials: int, epochs: int, concurrent: int) -> dict:
    """Plain Ray Tune: the same trials, at the same concurrency, nothing tracked, and with
    the same reuse of trial actors as the project's FIFO sweep (``reuse_actors``, see
    ``orchestration.running.tune_run.reuses_trial_drivers``): without it, starting an actor
    per trial, not the tracking, would be what the two differ in."""
    import ray
    from ray import tune

    per_dataset = max(1, trials // len(FORMATS))
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(plain_tune_trial, {"cpu": 0, "memory": 1}),
            param_space={
                "dataset": tune.grid_search(list(FORMATS)),
                "lr": tune.loguniform(1.0e-4, 1.0e-1),
                "sigma_init": tune.uniform(0.5, 2.0),
                "epochs": epochs,
            },
            tune_config=tune.TuneConfig(
                metric="score",
                mode="max",
                num_samples=per_dataset,
                max_concurrent_trials=concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                storage_path=tempfile.mkdtemp(prefix="sweep-scale-tune-"), verbose=0
            ),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    return {
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trials": len(results),
    }


def child(argv: list[str]) -> None:
    """``--child project|tune``: one measurement, printed as the last line in JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("project", "tune"))
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--uri")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--concurrent", type=int)
    args = parser.parse_args(argv)
    phases = Path(tempfile.mkdtemp(prefix="sweep-scale-phases-"))
    os.environ["SWEEP_SCALE_PHASES"] = str(phases)  # before Ray starts: its workers inherit it
    if args.child == "project":
        result = measure_project(args.folder, args.trials, args.epochs, args.concurrent, args.uri)
    else:
        result = measure_tune(args.trials, args.epochs, args.concurrent)
    result["phases"] = mean_phases(phases)
    shutil.rmtree(phases, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, log: Path, **options: Any) -> dict:
    command = [sys.executable, __file__, "--child", kind]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    lines = log.read_text(errors="replace").splitlines()
    results = [line[len("RESULT ") :] for line in lines if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"sweep_scale: the {kind} run failed (exit {done.returncode}):\n{tail}")
    return json.loads(results[-1])


# ---- tracking servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


SERVINGS = {
    "postgres": "stack",
    "postgres-access-log": "access-log",
    "postgres-gunicorn": "gunicorn",
}
"""``--tracking`` choices on PostgreSQL, and how :class:`PostgresMlflow` serves each."""


class PostgresMlflow:
    """A throwaway PostgreSQL cluster and an ``mlflow server`` on it, both on 127.0.0.1.

    ``serving``: ``stack``, as the compose stack serves (uvicorn, without its access log);
    ``access-log``, the same with uvicorn's access log (``MLFLOW_UVICORN_OPTS=--access-log``);
    ``gunicorn``, with gunicorn (MLflow's ``--gunicorn-opts``) instead of uvicorn.
    """

    def __init__(self, folder: Path, *, serving: str = "stack"):
        self.folder = folder
        self.serving = serving
        self.pg_folder = Path(tempfile.mkdtemp(prefix="sweep-scale-pg-"))
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> str:
        from tests.integration.compose_mlflow import compose_mlflow_settings

        if os.geteuid() == 0:
            shutil.chown(self.pg_folder, "postgres", "postgres")
        data, port = self.pg_folder / "data", free_port()

        def run(command: list[str]) -> None:
            subprocess.run(as_postgres_user(command), check=True, capture_output=True, timeout=120)

        run([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
        run([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-o",
             f"-p {port} -h 127.0.0.1 -k {self.pg_folder}", "-l",
             str(self.pg_folder / "server.log"), "-w", "start"])  # fmt: skip
        run([str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
             "postgres", "mlflow"])  # fmt: skip
        self.data = data
        http_port = free_port()
        mlflow = Path(sys.executable).with_name("mlflow")
        log = (self.folder / "mlflow-server.log").open("w")
        settings = compose_mlflow_settings()  # as the stack runs it
        gunicorn = self.serving == "gunicorn"
        if gunicorn:  # MLflow refuses options for two servers at once
            settings.pop("MLFLOW_UVICORN_OPTS", None)
        elif self.serving == "access-log":
            settings["MLFLOW_UVICORN_OPTS"] = "--access-log"
        self.server = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(http_port),
             "--workers", "2", *(["--gunicorn-opts", "--log-level=warning"] * gunicorn),
             "--backend-store-uri", f"postgresql://postgres@127.0.0.1:{port}/mlflow",
             "--artifacts-destination", str(self.folder / "mlflow-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_UVICORN_OPTS"},
                 **settings},
        )  # fmt: skip
        uri = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).close()
                return uri
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    message = "sweep_scale: mlflow server on PostgreSQL did not start"
                    raise SystemExit(message) from None
                time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(timeout=60)
        subprocess.run(
            as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                              "stop"]),
            capture_output=True, timeout=120,
        )  # fmt: skip
        shutil.rmtree(self.pg_folder, ignore_errors=True)


# ---- the benchmark ------------------------------------------------------------------------------


def compare_seconds(uri: str, folder: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestration.compare", "sweep-scale", "--tracking-uri", uri],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    (folder / "compare.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"sweep_scale: orchestration.compare failed:\n{done.stderr[-2000:]}")
    return elapsed


def runs_table_seconds(uri: str) -> tuple[float, float]:
    """Seconds for headless Chromium to show the experiment's runs table (its first rows), and
    then to show the sweep's child runs under its parent run (``tests/integration/mlflow_ui``,
    as the UI test drives it)."""
    from mlflow.tracking import MlflowClient

    from tests.integration.mlflow_ui import RunsTable, missing_browser

    reason = missing_browser()
    if reason:
        raise SystemExit(f"sweep_scale: --ui: {reason}")
    experiment = MlflowClient(uri).get_experiment_by_name("sweep-scale")
    url = f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs"
    with RunsTable() as table:
        started = time.perf_counter()
        table.open(url, timeout=300)
        opened = time.perf_counter() - started
        parent = next(row for row in table.rows() if row.depth == 0)
        started = time.perf_counter()
        table.expand(parent.run_id, timeout=300)
        expanded = time.perf_counter() - started
    return opened, expanded


def sampler(wanted: bool) -> Any:
    """CPU by kind of process over a block (``--cpu``), or nothing (None in the block)."""
    return cpu_sampler() if wanted else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000, help="in all, over 4 datasets")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-seconds", type=float, default=0.1)
    parser.add_argument("--concurrent", type=int, default=8, help="trials at a time")
    parser.add_argument("--tracking", nargs="+",
                        choices=("sqlite", *SERVINGS), help="postgres-*: the same server "
                        "served otherwise (see PostgresMlflow)",
                        default=["sqlite", "postgres"])  # fmt: skip
    parser.add_argument("--keep", type=Path, help="keep the runs' files in this folder")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of measuring (plain Tune, then each store, the "
                        "stores taking turns at going first); last line: medians")  # fmt: skip
    parser.add_argument("--cpu", action="store_true",
                        help="also print the CPU each kind of process took in each run "
                        "(read from /proc twice a second)")  # fmt: skip
    parser.add_argument("--ui", action="store_true",
                        help="also time the MLflow runs table in headless Chromium "
                        "(PostgreSQL store only: its server is up)")  # fmt: skip
    args = parser.parse_args()
    os.environ["SWEEP_SCALE_EPOCH_S"] = str(args.epoch_seconds)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if set(args.tracking) & set(SERVINGS) and not (POSTGRES_BIN / "initdb").exists():
        raise SystemExit(f"sweep_scale: --tracking postgres needs {POSTGRES_BIN}/initdb")
    top = args.keep or Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    top.mkdir(parents=True, exist_ok=True)
    options = {"trials": args.trials, "epochs": args.epochs, "concurrent": args.concurrent}
    print(
        f"{args.trials} trials ({args.trials // len(FORMATS)} per dataset x {len(FORMATS)}), "
        f"{args.epochs} epochs of {args.epoch_seconds} s, {args.concurrent} at a time; "
        f"files under {top}",
        flush=True,
    )
    measured: dict[str, list[dict[str, float]]] = {store: [] for store in args.tracking}
    for round_ in range(args.repeat):
        # Each round measures plain Tune again; the stores take turns at going first.
        shift = round_ % len(args.tracking)
        stores = args.tracking[shift:] + args.tracking[:shift]
        if args.repeat > 1:
            print(f"round {round_ + 1} of {args.repeat}: plain Tune, then {', '.join(stores)}")
        for store, result in measure_round(args, top / f"round-{round_ + 1}", stores, options):
            measured[store].append(result)
    summary = ""
    for store, results in measured.items():
        middle = {key: statistics.median(r[key] for r in results) for key in results[0]}
        if args.repeat > 1:
            ratios = ", ".join(f"{r['ratio']:.2f}" for r in results)
            print(
                f"project ({store}), median of {args.repeat} rounds: ratio "
                f"{middle['ratio']:.2f} (each: {ratios}), end {middle['end']:.1f} s, "
                f"compare {middle['compare']:.1f} s"
            )
        summary = (
            f"sweep_scale: {args.trials} trials, project {middle['project']:.1f} s, tune "
            f"{middle['tune']:.1f} s, ratio {middle['ratio']:.2f}, end {middle['end']:.1f} s, "
            f"compare {middle['compare']:.1f} s"
        )
    print(summary)


def measure_round(
    args: argparse.Namespace, top: Path, stores: list[str], options: dict[str, int]
) -> Iterator[tuple[str, dict[str, float]]]:
    """Plain Tune, then the project on each of ``stores``, each printed as it is measured;
    yields each store's (project wall, tune wall, ratio, end, compare)."""
    top.mkdir(parents=True, exist_ok=True)
    with sampler(args.cpu) as cpu:
        tune = run_child("tune", top / "tune.log", **options)
    trials = tune["trials"]
    print(
        f"plain Ray Tune: {tune['wall_s']:.1f} s, driver peak {tune['peak_rss_mb']:.0f} MB, "
        f"per trial: epochs {tune['phases']['epochs']:.2f} s"
    )
    print_cpu("plain Ray Tune", cpu, trials)
    for store in stores:
        folder = top / store
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if store == "sqlite":
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            with sampler(args.cpu) as cpu:
                ours = run_child("project", folder / "sweep.log", folder=folder, uri=uri,
                                 **options)  # fmt: skip
            compare = compare_seconds(uri, folder)
        else:
            with PostgresMlflow(folder, serving=SERVINGS[store]) as uri:
                with sampler(args.cpu) as cpu:
                    ours = run_child("project", folder / "sweep.log", folder=folder, uri=uri,
                                     **options)  # fmt: skip
                compare = compare_seconds(uri, folder)
                if args.ui:
                    opened, expanded = runs_table_seconds(uri)
                    print(
                        f"MLflow runs table ({store}, headless Chromium): shown in "
                        f"{opened:.1f} s, the sweep's {trials} child runs under its parent "
                        f"in {expanded:.1f} s more",
                        flush=True,
                    )
        ratio = ours["wall_s"] / tune["wall_s"]
        per_trial = (ours["wall_s"] - tune["wall_s"]) / trials
        print(
            f"project ({store}): {ours['wall_s']:.1f} s, ratio {ratio:.2f}, "
            f"{per_trial * 1000:+.0f} ms per trial, driver peak {ours['peak_rss_mb']:.0f} MB, "
            f"sweep end {ours['end_s']:.1f} s, compare {compare:.1f} s, "
            f"{ours['trials_on_leaderboard']} trials on the leaderboard"
        )
        phases = ours["phases"]
        print(
            f"project ({store}) per trial: opening its run {phases['start'] * 1000:.0f} ms, "
            f"epochs {phases['epochs']:.2f} s (plain Tune {tune['phases']['epochs']:.2f} s), "
            f"closing its run {phases['end'] * 1000:.0f} ms",
            flush=True,
        )
        print_cpu(f"project ({store})", cpu, trials)
        yield (
            store,
            {
                "project": ours["wall_s"],
                "tune": tune["wall_s"],
                "ratio": ratio,
                "end": ours["end_s"],
                "compare": compare,
            },
        )


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[1:])
    else:
        main()
