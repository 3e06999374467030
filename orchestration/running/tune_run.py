"""Every trial of a sweep in one Ray Tune ``Tuner`` on a Ray started or joined for it:
the trainable and its resources, the search algorithm and per-dataset schedulers, the
driver's callbacks, restoring a sweep for ``--resume``, Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from orchestration.definition.sweep_config import SweepConfig
from orchestration.running import trial_run_ids
from orchestration.running.locations import Locations
from orchestration.running.storage import check_storage_reaches_every_node
from orchestration.running.sweep_output import SweepOutput, say
from orchestration.running.termination import released_on_sigterm

DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
"""What each trial's Tune driver asks of Ray when Ray Train runs its workers (bytes of logical
memory): the workers ask for the CPUs and GPUs."""


def trial_resources(sweep: SweepConfig) -> dict[str, float]:
    """What each trial's Tune process asks of Ray: :data:`DRIVER_RESOURCES`, or the one
    worker's CPUs and GPUs when it trains itself (``resources.runner: trial``)."""
    res = sweep.resources
    if res.runner != "trial":
        return DRIVER_RESOURCES
    return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}


def fit_on_ray(
    sweep: SweepConfig,
    where: Locations,
    sweep_id: str,
    parent_run_id: str,
    tracker: Any,
    resuming: bool,
    output: SweepOutput | None = None,
    trial_function: Callable[[dict[str, Any], Any], None] | None = None,
) -> Any:
    """Every trial, on a Ray started (or joined) for the purpose; KeyboardInterrupt when
    Ctrl-C stopped Tune.

    ``trial_function``: what each trial runs instead of
    :func:`~orchestration.running.trial.run_trial` (called with the Tune config and the
    :class:`~orchestration.running.trial.SweepContext`). For ``benchmarks/sweep_scale.py``
    only, which measures everything around the training with a stand-in for it.
    """
    import ray

    verbose = output is None or output.verbose
    _init_ray(where, configure_logging=verbose)
    if output is not None:
        output.route_ray_processes()
    try:
        check_storage_reaches_every_node(sweep.storage, where.storage_root)
        with released_on_sigterm(), ctrl_c_watch() as interrupted:
            results = _fit(
                sweep, where, sweep_id, parent_run_id, tracker, resuming, verbose, trial_function
            )
    finally:
        trial_run_ids.forget_sweep(sweep_id)  # a joined cluster outlives the sweep
        ray.shutdown()
    if interrupted():
        raise KeyboardInterrupt
    return results


TRACKING_CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
"""MLflow's standard client credentials, which the trials need as much as the driver."""


def tracking_credentials() -> dict[str, str]:
    """The tracking server's credentials of this process, for the trials on a cluster whose
    nodes were not started with them (a sweep run from a laptop against a shared cluster).

    Inside a Ray Job (whose driver Ray starts with ``RAY_JOB_CONFIG_JSON_ENV_VAR``) nothing
    is forwarded: the job's driver and its workers share the head's environment, and its
    runtime environment is the job's.
    Ray shows a job's runtime environment to whoever holds the cluster's token, who can run
    code there anyway.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    return {k: os.environ[k] for k in TRACKING_CREDENTIAL_VARIABLES if os.environ.get(k)}


LOCAL_RAY_TRAIN_SETTINGS = {
    # One machine is never drained or reclaimed: Ray Train's per-trial preemption watcher
    # (an actor process of its own, polling every 5 s) has nothing to watch there.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's Prometheus metrics are for a dashboard the local Ray does not start.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # The controller notices a worker group's start and end at its next poll (2 s by
    # default); at 0.5 s a trial of the demo starts and ends about 2 s sooner each side.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Ray Train's switches for the Ray a sweep starts on its own machine (its embedded default),
measured with ``benchmarks/sweep_overhead.py``. A value set in the environment wins; a sweep
that joins a cluster leaves the cluster's settings alone."""


TUNE_RESULT_FILES_OFF = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
"""Tune's own per-trial result files (``progress.csv``, ``result.json``, ``params.json`` and
TensorBoard events) are off: MLflow records every result, the terminal shows them, and nothing
reads those files. Writing them was a fifth of the sweep driver's CPU in a 1,000-trial sweep
(TensorBoard's event writer most of it), and three files per trial in the storage, S3 included.
A value set in the environment wins (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` brings them
back)."""


def reuses_trial_drivers(sweep: SweepConfig) -> bool:
    """Whether Tune hands a finished trial's driver actor to the next trial (its
    ``reuse_actors``) instead of starting a new process that imports Ray Train, MLflow and the
    library again: about 5 s of CPU a trial, which a small machine takes from the training
    beside it (measured with ``benchmarks/sweep_overhead.py``). A trial that failed never
    passes its actor on.

    Only where no scheduler stops trials early (``fifo``): Tune would reuse the driver of a
    trial it stopped while that driver's Ray Train run is still training (the run ends with
    its driver's process, which reuse keeps alive), and after 2 s it fails the next trial with
    "Could not re-use actor".
    """
    return sweep.search.scheduler.type == "fifo"


def apply_local_ray_train_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Put :data:`LOCAL_RAY_TRAIN_SETTINGS` into ``environ`` (``os.environ`` by default)
    where it has no value of its own, before ``ray.init`` starts the processes that read
    them; returns the settings in force."""
    environ = os.environ if environ is None else environ
    for name, value in LOCAL_RAY_TRAIN_SETTINGS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in LOCAL_RAY_TRAIN_SETTINGS}


def _init_ray(where: Locations, *, configure_logging: bool = True) -> None:
    """Start or join Ray; ``configure_logging=False`` leaves Ray's driver logger without a
    terminal handler of its own (its records then reach the sweep's log file)."""
    import ray

    options: dict[str, Any] = {"log_to_driver": True, "configure_logging": configure_logging}
    if where.ray_address:
        credentials = tracking_credentials()
        if credentials:
            options["runtime_env"] = {"env_vars": credentials}
        ray.init(address=where.ray_address, **options)
    else:
        apply_local_ray_train_settings()
        ray.init(include_dashboard=False, **options)


def _fit(
    sweep: SweepConfig,
    where: Locations,
    sweep_id: str,
    parent_run_id: str,
    tracker: Any,
    resuming: bool,
    verbose: bool = True,
    trial_function: Callable[[dict[str, Any], Any], None] | None = None,
) -> Any:
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestration.definition.schedulers import TUNE_ENV, build_scheduler
    from orchestration.definition.search_space import param_space
    from orchestration.definition.trial_names import trial_label, trial_params
    from orchestration.running.storage import Storage
    from orchestration.running.trial import (
        SweepContext,
        checkpoint_config,
        run_trial,
        trial_failure_config,
    )
    from orchestration.tracking.run_closing import RunCloser

    os.environ.update(TUNE_ENV)  # epochs without an evaluation report no score
    for name, value in TUNE_RESULT_FILES_OFF.items():
        os.environ.setdefault(name, value)
    if all(os.environ.get(name) == value for name, value in TUNE_RESULT_FILES_OFF.items()):
        # Tune's result grid then finds no result files to read into per-trial dataframes,
        # which nothing here uses (the leaderboard reads each trial's last result), and
        # would warn once per trial that it could not.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    storage = Storage(where.storage_root, where.storage_endpoint)
    storage_path, filesystem = storage.ray_storage()
    context = SweepContext(
        sweep=sweep.model_dump(mode="json"),
        sweep_id=sweep_id,
        parent_run_id=parent_run_id,
        tracking_uri=where.tracking_uri,
        experiment_id=tracker.experiment_id,
        storage_root=where.storage_root,
        storage_endpoint=where.storage_endpoint,
        work_dir=str(where.output_dir / "trials"),
        # The embedded local Ray runs without its dashboard (see _init_ray).
        placement_group_cleaner=bool(where.ray_address),
        new_sweep=not resuming,
    )
    # A trial driver of Train workers holds no CPU, so the workers can take all of them; Ray
    # refuses an empty request, hence a token amount of (logical) memory.
    resources = DRIVER_RESOURCES if trial_function else trial_resources(sweep)
    trainable = tune.with_parameters(
        tune.with_resources(trial_function or run_trial, resources), context=context
    )
    run_config = tune.RunConfig(
        name=sweep_id,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[RunCloser(tracker, sweep_id), trial_progress(sweep)],
        failure_config=trial_failure_config(sweep),
        # Checkpoints Tune keeps itself: those of trials that train in their own process.
        checkpoint_config=checkpoint_config(sweep, tune.CheckpointConfig),
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
        from orchestration.definition.search_space import trials_per_dataset
        from orchestration.definition.tpe_search import tpe_searcher

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
            reuse_actors=reuses_trial_drivers(sweep),
        ),
        run_config=run_config,
    )
    return tuner.fit()


def trial_progress(sweep: SweepConfig) -> Any:
    """The Tune callback printing each trial's epochs and end (see :mod:`sweep_output`)."""
    from orchestration.definition.search_space import trials_per_dataset
    from orchestration.definition.trial_experiments import trial_experiment
    from orchestration.definition.trial_names import DATASET_KEY, trial_params
    from orchestration.running.trial_progress import TrialProgress

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
