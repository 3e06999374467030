"""What trains in a trial (each Ray Train worker, or the trial's own process): the library's
one training loop, plus reporting.

``train_loop(loop_config)`` is the ``train_loop_per_worker`` of every trial's
``TorchTrainer``. It rebuilds the trial's :class:`~autoassign.config.ExperimentConfig`, runs
:class:`autoassign.engine.Trainer` (Ray Train has already initialised the process group, so
the engine wraps the model in DDP itself) with two callbacks:

- :class:`RayReporter` (every rank): one ``ray.train.report`` per epoch with the epoch's
  losses, its evaluation and ``score`` (the dataset's ranking metric), plus rank 0's
  checkpoint directory when one was written;
- :class:`~orchestration.tracking.trial_logging.MlflowTrialLogger` (rank 0): losses, lr and
  metrics into the trial's child run, whose id the trial driver passes in ``loop_config``;
  the metric points not sent yet travel in each checkpoint.

After a worker dies, Ray Train starts new workers and ``ray.train.get_checkpoint()`` hands
back the last reported checkpoint; training continues from it exactly (weights, optimizer,
schedule position, RNG states) into the same MLflow run.

The same loop runs in the trial's own Ray Tune process when the sweep asks for
``resources.runner: trial`` (:func:`tune_reporting`): its reports and checkpoints then go to
Tune directly, and a restarted trial continues from ``ray.tune.get_checkpoint()``.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoassign.config import ExperimentConfig
from autoassign.engine import Callback, Trainer, TrainState
from autoassign.errors import NonFiniteLossError
from orchestration.definition.trial_names import NONFINITE_KEY
from orchestration.tracking.retries import OUTAGE_WAIT_S

WARNINGS_KEY = "warnings"
"""A report's list of the project's warnings logged on rank 0 since the previous report:
the worker's output goes to the sweep's log file, these reach the terminal too."""


class WarningsForTheDriver(logging.Handler):
    """Keeps the messages of the project's warnings (``orchestration.*``, ``autoassign.*``)
    logged in this worker process, for :class:`RayReporter` to send with its next report."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []
        self.addFilter(lambda record: record.name.startswith(("orchestration", "autoassign")))

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        messages, self.messages = self.messages, []
        return messages


@dataclass(frozen=True)
class Reporting:
    """Where a worker's epochs and checkpoints go, and where a restart finds its checkpoint:
    Ray Train (:func:`train_reporting`) or Ray Tune (:func:`tune_reporting`)."""

    report: Callable[..., None]
    """``report(metrics, checkpoint=None)``."""
    get_checkpoint: Callable[[], Any]
    """The last reported checkpoint (a ``ray.train.Checkpoint``), or None on a first start."""
    checkpoint_from_directory: Callable[[str], Any]
    """The checkpoint class ``report`` takes, made from a local folder."""
    rank: int
    """This worker's rank in the trial's worker group (0 in a trial's own process)."""


def train_reporting() -> Reporting:
    """A Ray Train worker's: ``ray.train.report`` to the trial's Train controller."""
    import ray.train

    return Reporting(
        report=ray.train.report,
        get_checkpoint=ray.train.get_checkpoint,
        checkpoint_from_directory=ray.train.Checkpoint.from_directory,
        rank=ray.train.get_context().get_world_rank(),
    )


def tune_reporting() -> Reporting:
    """A Tune trial's own process: ``ray.tune.report`` straight to Tune, which persists the
    checkpoint in the sweep's storage and keeps ``storage.num_to_keep`` of them."""
    import ray.tune

    return Reporting(
        report=ray.tune.report,
        get_checkpoint=ray.tune.get_checkpoint,
        checkpoint_from_directory=ray.tune.Checkpoint.from_directory,
        rank=0,
    )


class RayReporter(Callback):
    """Reports each epoch to Ray Train or Tune (all ranks report; rank 0 attaches the checkpoint).

    Reported keys: ``epoch`` (epochs completed, Tune's time axis), ``iteration``,
    ``train/<loss>`` (epoch means), and on an evaluated epoch the evaluation metrics and
    ``score``: the ranking metric (0.0, the lowest AP, when the evaluation gave no finite
    value, since Ray Train's saved checkpoint order turns a NaN into null).

    Rule: an epoch without an evaluation reports no ``score``, neither 0 nor the last one.
    Tune's schedulers and searcher then skip it (early stopping decides on evaluations
    only), and Ray Train ranks its checkpoint below every scored one (logging that the key
    is missing). Tune must not check for the metric strictly: see
    :data:`orchestration.definition.schedulers.TUNE_ENV`.

    Attributes:
        score: the score of the last reported epoch, NaN when it had no evaluation (for a
            report that must carry the key; the sweep's ASHA ignores a NaN).
    """

    def __init__(self, ranking_metric: str, *, reporting: Reporting, keep_local: int = 1):
        self.ranking_metric = ranking_metric
        self.reporting = reporting
        """Where the reports go."""
        self.keep_local = keep_local
        self.pending_checkpoint: Path | None = None
        self.score = math.nan
        self.reported_dirs: list[Path] = []
        self.resumed_from: int | None = None
        """Epochs completed by the checkpoint this worker group started from, if any: sent
        once, as ``resumed_from_epoch`` (the terminal says the trial continued from it)."""
        self.warnings: WarningsForTheDriver | None = None
        """Rank 0's warnings, sent as ``warnings`` (see :data:`WARNINGS_KEY`)."""

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self.pending_checkpoint = Path(path)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.score = self._score_of(metrics)
        epoch_report: dict[str, Any] = {
            "epoch": state.epochs_completed,
            "iteration": state.iteration,
            **({} if math.isnan(self.score) else {"score": self.score}),
            **({} if self.resumed_from is None else {"resumed_from_epoch": self.resumed_from}),
            **self._warnings(),
            **{f"train/{name}": value for name, value in state.epoch_losses.items()},
            # Per-class APs go to MLflow only: Tune's table and result files stay readable.
            **{name: value for name, value in metrics.items() if not name.startswith("AP/")},
        }
        checkpoint = None
        if self.pending_checkpoint is not None and state.is_main_process:
            checkpoint = self.reporting.checkpoint_from_directory(str(self.pending_checkpoint))
        self.reporting.report(epoch_report, checkpoint=checkpoint)
        self.resumed_from = None
        if self.pending_checkpoint is not None and state.is_main_process:
            self._prune_local(self.pending_checkpoint)
        self.pending_checkpoint = None

    def _warnings(self) -> dict[str, list[str]]:
        messages = self.warnings.take() if self.warnings is not None else []
        return {WARNINGS_KEY: messages} if messages else {}

    def _score_of(self, metrics: dict[str, float]) -> float:
        """The epoch's score (see the class docstring); NaN when it was not evaluated."""
        if self.ranking_metric not in metrics:
            return math.nan
        value = metrics[self.ranking_metric]
        return value if math.isfinite(value) else 0.0

    def _prune_local(self, reported: Path) -> None:
        """Ray has copied the checkpoint to storage: drop older local copies."""
        self.reported_dirs.append(reported)
        while len(self.reported_dirs) > self.keep_local:
            shutil.rmtree(self.reported_dirs.pop(0), ignore_errors=True)


def train_loop(loop_config: dict[str, Any], reporting: Reporting | None = None) -> str | None:
    """The ``train_loop_per_worker`` of a trial (see the module docstring); returns the
    reason when the loss went non-finite (the loop then ends with a report, not an error).

    ``loop_config`` keys: ``experiment`` (the ExperimentConfig as plain data), ``work_dir``
    (rank 0's local folder), ``ranking_metric``, and, when tracking, ``tracking_uri``,
    ``run_id``, ``tracking_wait_s`` (how long an unreachable server is waited out),
    ``metrics_flush_every_s`` (``tracking.flush_every_s``) and ``early_stopping`` (the sweep's
    scheduler may stop the trial on an evaluation's report: each is sent to MLflow at once).
    ``reporting``: where the epochs go, Ray Train's when None.
    """
    reporting = reporting or train_reporting()
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    rank = reporting.rank
    work_dir = Path(loop_config["work_dir"])
    reporter = RayReporter(loop_config["ranking_metric"], reporting=reporting)
    if rank == 0:
        reporter.warnings = WarningsForTheDriver()
        logging.getLogger().addHandler(reporter.warnings)
    try:
        return _train(config, loop_config, reporting, reporter, work_dir)
    finally:
        # A trial's own process trains the next trial too (Tune reuses it).
        if reporter.warnings is not None:
            logging.getLogger().removeHandler(reporter.warnings)


def _train(
    config: ExperimentConfig,
    loop_config: dict[str, Any],
    reporting: Reporting,
    reporter: RayReporter,
    work_dir: Path,
) -> str | None:
    from orchestration.tracking.trial_logging import MlflowTrialLogger

    rank = reporting.rank
    callbacks: list[Callback] = [reporter]
    logger = None
    if rank == 0 and loop_config.get("run_id"):
        logger = MlflowTrialLogger(
            loop_config["tracking_uri"],
            loop_config["run_id"],
            log_every_iters=config.train.log_every_iters,
            ranking_metric=loop_config["ranking_metric"],
            flush_timeout=loop_config.get("tracking_wait_s", OUTAGE_WAIT_S),
            flush_every_s=loop_config.get("metrics_flush_every_s", 0.0),
            flush_evaluations=loop_config.get("early_stopping", False),
        )
        # Before the reporter: the logger leaves its waiting metric points in the epoch's
        # checkpoint folder, which the reporter then hands to Ray.
        callbacks.insert(0, logger)
    trainer = Trainer(
        config,
        callbacks=callbacks,
        output_dir=work_dir,
        checkpoint_dir=work_dir / "checkpoints",
        show_progress=rank == 0,
    )
    if logger is not None:
        logger.trainer = trainer
    checkpoint = reporting.get_checkpoint()
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.load_checkpoint(directory)
                if logger is not None:
                    logger.restore(directory)
            reporter.resumed_from = trainer.state.epochs_completed
        trainer.fit()
    except NonFiniteLossError as error:
        # Every rank raises it together (the engine agrees on it first); ending the loop with
        # a report, not an exception, keeps Ray from restarting a run that would repeat it.
        # Ray's Result only keeps the metrics of checkpointed reports, so rank 0 also marks
        # the MLflow run FAILED with the reason, which is where the trial driver looks.
        if logger is not None:
            logger.fail(str(error))
        reporting.report(
            {
                NONFINITE_KEY: str(error),
                "epoch": trainer.state.epochs_completed,
                **({} if math.isnan(reporter.score) else {"score": reporter.score}),
            }
        )
        return str(error)
    return None
