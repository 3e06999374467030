"""What the training loop shows its callbacks: where the run is and where it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


@dataclass
class TrainState:
    """The progress of one training run, updated by the Trainer as it goes.

    Attributes:
        epoch: 0-based index of the epoch being trained (``on_step``) or just finished
            (``on_epoch_end``, and ``on_checkpoint`` for a checkpoint written at an epoch end).
        epochs_completed: epochs fully trained so far; set to ``epoch + 1`` before
            ``on_checkpoint`` / ``on_epoch_end`` of an epoch end. Unambiguous in every hook.
        max_epochs: epochs of the schedule.
        iteration: optimizer steps taken so far over the whole run (global, 0-based count).
        batch_in_epoch: batches of the current epoch consumed so far.
        iters_per_epoch: batches per epoch per process.
        max_iterations: ``max_epochs * iters_per_epoch``.
        lr: the learning rate of the last step.
        skipped_steps: steps skipped because of a non-finite loss (``on_nonfinite_loss: skip``).
        rank, world_size: this process in the data-parallel group.
        output_dir: where rank 0 writes metrics, configs and plots.
        checkpoint_dir: where checkpoints go.
        should_stop: set by a callback to end the run after the current step; the Trainer
            then writes a checkpoint (so the run can be resumed) and returns.
        status: ``"running"`` while training, then ``"finished"`` (end of the schedule),
            ``"stopped"`` (a callback set ``should_stop`` before the end) or ``"failed"``
            (an exception ended the run); ``on_train_end`` sees the final value.
        error: the message of the exception that failed the run, else None.
        epoch_losses: mean of ``loss`` and each loss term over the steps of the epoch
            ``epoch`` (finite values only; already averaged across ranks). For an epoch
            resumed in its middle, the mean over the steps run since the resume.
        primary_metric: the evaluator's headline metric name (e.g. ``bbox_mAP``), a key of
            the metrics of ``on_epoch_end`` / ``on_train_end`` when the epoch was evaluated.
        extra: free-form state saved in checkpoints and restored on resume, for callbacks
            (e.g. the id of a tracking run to continue).
    """

    epoch: int = 0
    epochs_completed: int = 0
    max_epochs: int = 0
    iteration: int = 0
    batch_in_epoch: int = 0
    iters_per_epoch: int = 0
    max_iterations: int = 0
    lr: float = 0.0
    skipped_steps: int = 0
    rank: int = 0
    world_size: int = 1
    output_dir: Path = Path(".")
    checkpoint_dir: Path = Path("checkpoints")
    should_stop: bool = False
    status: str = RUNNING
    error: str | None = None
    epoch_losses: dict[str, float] = field(default_factory=dict)
    primary_metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0
