"""A Tune callback in the sweep driver that ends each trial's MLflow run as Tune ends it.

The trial driver ends its own run when ``TorchTrainer.fit()`` returns or raises. What it
cannot see is being stopped from outside: an early-stopping scheduler ends the trial's actor,
so its run would stay RUNNING. This callback closes those as KILLED, tagged
``autoassign.early_stopped``, and closes as FAILED (with the error) a trial whose driver died
before it could say so itself.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from orchestration.tracking import TAG_EARLY_STOPPED, TAG_SWEEP_ID, TAG_TRIAL_ID, Tracker


class RunCloser(Callback):
    def __init__(self, tracker: Tracker, sweep_id: str):
        self.tracker = tracker
        self.sweep_id = sweep_id

    def _running_run(self, trial: Any) -> str | None:
        runs = self.tracker.find_runs(**{TAG_SWEEP_ID: self.sweep_id, TAG_TRIAL_ID: trial.trial_id})
        for run in runs:
            if run.info.status == "RUNNING":
                return run.info.run_id
        return None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_run(trial)
        if run_id is not None:
            self.tracker.set_tags(run_id, {TAG_EARLY_STOPPED: "true"})
            self.tracker.end_run(run_id, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_run(trial)
        if run_id is not None:
            reason = (getattr(trial, "error_message", None) or "the trial failed").strip()
            self.tracker.end_run(run_id, "FAILED", reason=reason.splitlines()[0][:2000])
