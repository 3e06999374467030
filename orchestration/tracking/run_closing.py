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
        final_wait: float | None = None,
    ):
        self.tracker = tracker
        self.sweep_id = sweep_id
        self.attempt_timeout = attempt_timeout
        self.retry_every = retry_every
        self.final_wait = tracker.wait if final_wait is None else final_wait
        self.pending: dict[str, Closing] = {}
        """Closes not done yet, by trial id."""
        self._warned: set[str] = set()
        self._next_retry = 0.0

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
        self._request(trial.trial_id, Closing("KILLED", early_stopped=True))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._request(trial.trial_id, Closing("FAILED", reason=error_reason(trial)))

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

    def _request(self, trial_id: str, closing: Closing) -> None:
        self.pending[trial_id] = closing  # a later request replaces an earlier one
        self._retry_pending()

    def _retry_pending(self) -> bool:
        """Try the pending closes once each, up to the first that fails (the server is down:
        the others would wait for nothing), which goes last for the next round; True while
        some are left."""
        for trial_id, closing in list(self.pending.items()):
            try:
                self._close(trial_id, closing)
            except Exception as error:
                if trial_id not in self._warned:
                    self._warned.add(trial_id)
                    logger.warning(
                        "MLflow unreachable (%s): the run of trial %s is closed (%s) once it "
                        "answers",
                        first_line(error, limit=300),
                        trial_id,
                        closing.status,
                    )
                self.pending[trial_id] = self.pending.pop(trial_id)
                break
            del self.pending[trial_id]
            if trial_id in self._warned:
                self._warned.discard(trial_id)
                logger.warning("MLflow reachable again: the run of trial %s is closed", trial_id)
        self._next_retry = time.monotonic() + self.retry_every
        return bool(self.pending)

    def _close(self, trial_id: str, closing: Closing) -> None:
        """End the trial's run as ``closing`` says if it is still RUNNING (raises when the
        tracking server does not answer within :attr:`attempt_timeout`)."""
        timeout = self.attempt_timeout
        with fail_fast_requests():
            runs = self.tracker.find_runs(
                timeout=timeout, **{TAG_SWEEP_ID: self.sweep_id, TAG_TRIAL_ID: trial_id}
            )
            running = [run.info.run_id for run in runs if run.info.status == "RUNNING"]
            for run_id in running:
                self.tracker.end_run(
                    run_id,
                    closing.status,
                    reason=closing.reason,
                    tags={TAG_EARLY_STOPPED: "true"} if closing.early_stopped else None,
                    timeout=timeout,
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
