"""The terminal's lines about trials: one per trial per epoch, and one when a trial ends.

A Ray Tune callback in the sweep driver (see :mod:`orchestration.running.sweep_output` for what
else the terminal shows)::

    coco·sigma=1  epoch 3/16  loss 1.501 (pos 1.249, neg 0.094, center 0.16)  0:31 elapsed, ETA 2:14
    coco·sigma=1  epoch 8/16  loss 0.912 (...)  bbox_mAP 0.2310  1:22 elapsed, ETA 1:22
    coco·sigma=1  finished: 16 epochs in 2:44, bbox_mAP 0.4314  (3/8 trials ended)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from orchestration.running.sweep_output import LOG_FILE, say


class TrialProgress(Callback):
    """One terminal line per trial per epoch, and one when a trial ends.

    Args:
        ranking_metrics: each dataset's ranking metric, by dataset name (shown when an epoch
            was evaluated).
        epochs_of: a trial's epoch count from its Tune config (``dataset`` and the searched
            parameters).
        trials_total: how many trials the sweep runs (for the "3/8 ended" count).

    An epoch is shown once, even when Tune sends it again; a result carrying
    ``resumed_from_epoch`` (the first report of workers started from a checkpoint: after a
    worker was lost, a restart by Tune or ``--resume``) gets a line saying so, and each of
    the rank-0 worker's warnings it carries (``warnings``: a tracking server being waited
    for) one line. Like every callback in Tune's loop, none of these raises.
    """

    def __init__(
        self,
        ranking_metrics: dict[str, str],
        epochs_of: Callable[[dict[str, Any]], int],
        trials_total: int,
        write: Callable[[str], None] = say,
    ):
        self.ranking_metrics = ranking_metrics
        self.epochs_of = epochs_of
        self.trials_total = trials_total
        self.write = write
        self.last_epoch: dict[str, int] = {}
        self.last_result: dict[str, dict[str, Any]] = {}
        self.epochs: dict[str, int | None] = {}
        self.ended = 0

    # ---- Tune's hooks -------------------------------------------------------------------------

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._safely(self._epoch_line, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self._end_line, trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self._end_line, trial, _error_reason(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self._recover_line, trial, None)

    # ---- lines ------------------------------------------------------------------------------

    def _safely(self, line: Callable[[Any, Any], None], trial: Any, extra: Any) -> None:
        try:
            line(trial, extra)
        except Exception as error:  # a missing line must not fail the trial
            logging.getLogger(__name__).warning(
                "no progress line for trial %s: %s", getattr(trial, "trial_id", "?"), error
            )

    def _epoch_line(self, trial: Any, result: dict[str, Any]) -> None:
        epoch = result.get("epoch")
        if not isinstance(epoch, int) or epoch <= self.last_epoch.get(trial.trial_id, 0):
            return
        name = str(trial)
        if result.get("resumed_from_epoch") is not None:
            self.write(
                f"{name}  continued from its checkpoint of epoch "
                f"{result['resumed_from_epoch']} (its workers were started again)"
            )
        for message in result.get("warnings") or ():
            self.write(f"{name}  warning: {message}")
        self.last_epoch[trial.trial_id] = epoch
        self.last_result[trial.trial_id] = result
        total = self._epochs(trial)
        words = [name, f"epoch {epoch}/{total or '?'}", _losses(result)]
        metric = self.ranking_metrics.get(trial.config.get("dataset"))
        if metric in result:
            words.append(f"{metric} {result[metric]:.4f}")
        elapsed = result.get("time_total_s")
        if isinstance(elapsed, (int, float)):
            timing = f"{duration(elapsed)} elapsed"
            if total and epoch < total:
                timing += f", ETA {duration(elapsed / epoch * (total - epoch))}"
            words.append(timing)
        self.write("  ".join(word for word in words if word))

    def _end_line(self, trial: Any, error: str | None) -> None:
        self.ended += 1
        result = self.last_result.get(trial.trial_id, {})
        epoch, total = self.last_epoch.get(trial.trial_id, 0), self._epochs(trial)
        if error is not None:
            where = "after its last epoch" if total and epoch >= total else f"in epoch {epoch + 1}"
            what = f"FAILED {where}: {error} (details: {LOG_FILE})"
        elif total and epoch < total:
            what = f"stopped early by the scheduler after epoch {epoch}/{total}"
        else:
            what = f"finished: {epoch} epochs"
        if error is None and isinstance(result.get("time_total_s"), (int, float)):
            what += f" in {duration(result['time_total_s'])}"
        metric = self.ranking_metrics.get(trial.config.get("dataset"))
        if error is None and metric in result:
            what += f", {metric} {result[metric]:.4f}"
        self.write(f"{trial}  {what}  ({self.ended}/{self.trials_total} trials ended)")

    def _recover_line(self, trial: Any, _: Any) -> None:
        self.write(
            f"{trial}  restarted by Tune after its driver failed: {_error_reason(trial)}; "
            f"continuing from its last checkpoint"
        )

    def _epochs(self, trial: Any) -> int | None:
        if trial.trial_id not in self.epochs:
            try:
                self.epochs[trial.trial_id] = self.epochs_of(trial.config)
            except Exception:
                self.epochs[trial.trial_id] = None
        return self.epochs[trial.trial_id]


def _losses(result: dict[str, Any]) -> str:
    """``loss 1.501 (pos 1.249, neg 0.094, center 0.159)`` from the ``train/*`` means."""
    total = result.get("train/loss")
    parts = [
        f"{key.removeprefix('train/').removeprefix('loss_')} {value:.3f}"
        for key, value in result.items()
        if key.startswith("train/") and key != "train/loss" and isinstance(value, float)
    ]
    if not isinstance(total, float):
        return ""
    return f"loss {total:.3f}" + (f" ({', '.join(parts)})" if parts else "")


def _error_reason(trial: Any) -> str:
    from orchestration.tracking.run_closing import error_reason

    return error_reason(trial)


def duration(seconds: float) -> str:
    """``1:05`` (minutes:seconds) or ``2:01:05`` from seconds."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
