"""A Tune callback in the sweep driver that ends each trial's MLflow run as Tune ends it.

The trial driver ends its own run when ``TorchTrainer.fit()`` returns or raises. What it
cannot see is being stopped from outside: an early-stopping scheduler ends the trial's actor,
so its run would stay RUNNING. This callback closes those as KILLED, tagged
``autoassign.early_stopped``, and closes as FAILED (with the error) a trial whose driver died
before it could say so itself.

It must never raise: Ray Tune turns an exception in a callback into an error of the trial at
hand, and a second one, from the error callback, stops the whole ``Tuner.fit`` with every
running trial. Nor may it hold up Tune's event loop for long. So each close is tried once
(MLflow's own retries off); one that could not be done is kept and tried again every
``retry_every`` seconds on Tune's steps, and at the end of the experiment for up to
``final_wait`` seconds, with a warning saying which runs are waiting.

Ended trials are closed together: Tune calls ``on_trial_complete`` for every trial, and almost
all of them ended their runs themselves, so the trials that completed within ``close_every``
seconds cost one search for the sweep's RUNNING runs, not one search each (at 1,000 trials a
search each was a tenth of the sweep driver's CPU). An errored trial is closed at once, before
Tune can start it again.

It also tells Tune when a retry cannot help: a trial that reported a non-finite loss gets no
Tune restarts (see ``orchestration.running.trial``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestration.common.error_text import first_line
from orchestration.definition.trial_names import NONFINITE_KEY
from orchestration.tracking.retries import fail_fast_requests
from orchestration.tracking.tags import TAG_EARLY_STOPPED, TAG_SWEEP_ID, TAG_TRIAL_ID
from orchestration.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Closing:
    """How a trial's run is to be ended, if Tune ended the trial while it was RUNNING."""

    status: str
    reason: str | None = None
    early_stopped: bool = False


class RunCloser(Callback):
    """Args:
    tracker: the sweep's tracker.
    sweep_id: the sweep whose trial runs are closed.
    attempt_timeout: how long one try of a close may keep retrying (0: a single request
        per call, each failing within seconds when the server is down).
    retry_every: how often closes that failed are tried again while Tune runs.
    close_every: how long a completed trial waits to be closed together with the trials that
        complete after it (an early-stopped run shows RUNNING that much longer).
    final_wait: how long the end of the experiment waits for them (default: the tracker's
        ``wait``, the bound every other tracking call waits out an outage for).
    """

    def __init__(
        self,
        tracker: Tracker,
        sweep_id: str,
        *,
        attempt_timeout: float = 0.0,
        retry_every: float = 30.0,
        close_every: float = 5.0,
        final_wait: float | None = None,
    ):
        self.tracker = tracker
        self.sweep_id = sweep_id
        self.attempt_timeout = attempt_timeout
        self.retry_every = retry_every
        self.close_every = close_every
        self.final_wait = tracker.wait if final_wait is None else final_wait
        self.pending: dict[str, Closing] = {}
        """Closes not done yet, by trial id."""
        self._warned: set[str] = set()
        self._next_retry = float("inf")  # no close is waiting

    # ---- Tune's hooks (none of them raises) -----------------------------------------------

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        try:
            if NONFINITE_KEY in result and trial.max_failures != 0:
                # Tune retries while failures <= max_failures (Trial.should_recover), whatever
                # the error; the driver raises next, and the trial ends at once instead.
                trial.max_failures = 0
                logger.warning(
                    "trial %s: non-finite loss, not retried: %s",
                    trial.trial_id,
                    result[NONFINITE_KEY],
                )
        except Exception as error:  # never into Tune; the driver refuses the retry anyway
            logger.warning("trial %s: retries not switched off: %s", trial.trial_id, error)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.pending[trial.trial_id] = Closing("KILLED", early_stopped=True)
        if not self._warned:  # while MLflow is unreachable the retries keep their pace
            self._next_retry = min(self._next_retry, time.monotonic() + self.close_every)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # At once: Tune may start the trial again, and its new attempt reopens the same run.
        self.pending[trial.trial_id] = Closing("FAILED", reason=error_reason(trial))
        self._retry_pending()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.pending and time.monotonic() >= self._next_retry:
            self._retry_pending()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        deadline = time.monotonic() + self.final_wait
        while self._retry_pending() and time.monotonic() < deadline:
            time.sleep(min(self.retry_every, 5.0))
        if self.pending:
            logger.warning(
                "MLflow unreachable: the runs of trial(s) %s could not be closed (%s) and stay "
                "RUNNING in sweep %s",
                ", ".join(sorted(self.pending)),
                ", ".join(sorted({c.status for c in self.pending.values()})),
                self.sweep_id,
            )

    # ---- closing ----------------------------------------------------------------------------

    def _retry_pending(self) -> bool:
        """Try the pending closes once, with one search for the sweep's RUNNING runs; on a
        failure (the server is down) the rest wait for the next round. True while some are
        left."""
        if not self.pending:
            self._next_retry = float("inf")
            return False
        try:
            running = self._running_runs()
        except Exception as error:
            self._warn_unreachable(list(self.pending), error)
        else:
            for trial_id, closing in list(self.pending.items()):
                try:
                    for run_id in running.get(trial_id, ()):
                        self._end(run_id, closing)
                except Exception as error:
                    self._warn_unreachable([trial_id], error)
                    self.pending[trial_id] = self.pending.pop(trial_id)  # last, next round
                    break
                del self.pending[trial_id]
                if trial_id in self._warned:
                    self._warned.discard(trial_id)
                    logger.warning(
                        "MLflow reachable again: the run of trial %s is closed", trial_id
                    )
        self._next_retry = time.monotonic() + self.retry_every if self.pending else float("inf")
        return bool(self.pending)

    def _warn_unreachable(self, trial_ids: list[str], error: Exception) -> None:
        for trial_id in trial_ids:
            if trial_id not in self._warned:
                self._warned.add(trial_id)
                logger.warning(
                    "MLflow unreachable (%s): the run of trial %s is closed (%s) once it answers",
                    first_line(error, limit=300),
                    trial_id,
                    self.pending[trial_id].status,
                )

    def _running_runs(self) -> dict[str, list[str]]:
        """The sweep's RUNNING runs' ids, by trial id (raises when the tracking server does
        not answer within :attr:`attempt_timeout`)."""
        with fail_fast_requests():
            runs = self.tracker.find_runs(
                timeout=self.attempt_timeout, status="RUNNING", **{TAG_SWEEP_ID: self.sweep_id}
            )
        by_trial: dict[str, list[str]] = {}
        for run in runs:
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id is not None:
                by_trial.setdefault(trial_id, []).append(run.info.run_id)
        return by_trial

    def _end(self, run_id: str, closing: Closing) -> None:
        with fail_fast_requests():
            self.tracker.end_run(
                run_id,
                closing.status,
                reason=closing.reason,
                tags={TAG_EARLY_STOPPED: "true"} if closing.early_stopped else None,
                timeout=self.attempt_timeout,
            )


def error_reason(trial: Any) -> str:
    """The last line of the trial's latest error in Tune's error file (for an exception the
    driver raised, ``Type: message``), or a plain phrase when there is none to read."""
    try:
        path = trial.error_file
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    except Exception:  # no local trial folder: the status matters more than the words
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:2000] if lines else "the trial failed"
