"""Where a resumed run continues: the checkpoint's position, mapped to this world size.

A checkpoint records ``epoch``, ``batch_in_epoch`` and ``iteration`` as counted at the world
size that wrote it. The schedule is a function of the global iteration, and an epoch has
``iters_per_epoch`` iterations at the current world size, so a run resumed on a different
number of processes needs that position expressed in its own iterations:

- same world size: exactly where the checkpoint left off;
- another world size at an epoch boundary (``batch_in_epoch == 0``): the same epoch, global
  iteration ``epoch * iters_per_epoch`` of the new world size. Warmup is counted in these
  new iterations (``train.warmup_iters`` of the new run), and the peak learning rate is the
  new one of the linear scaling rule;
- another world size mid-epoch: the batch sampler
  (:class:`autoassign.data.samplers.GroupedDistributedBatchSampler`) cuts an epoch into one
  list of batches that depends on ``(seed, epoch, batch_size)`` only, and step ``k`` on ``W``
  processes consumes its batches ``k*W .. k*W + W - 1``. So the ``samples_seen`` images of
  ``b`` steps on ``W`` processes are exactly those of ``b' = samples_seen / (batch_size * W')``
  steps on ``W'`` processes when that division is exact and the per-process batch size is
  unchanged; otherwise images would be repeated or skipped and the resume is refused. (The
  batches dropped at the end of an epoch, ``T mod W``, follow the new world size, as in a
  fresh epoch at that size.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoassign.errors import CheckpointError


@dataclass(frozen=True)
class ResumePosition:
    """Where to continue, counted at the current world size.

    Attributes:
        epoch: the epoch to train next (0-based).
        batch_in_epoch: batches of it already trained, per process.
        iteration: global optimizer steps taken so far (the schedule's position).
        remapped: the checkpoint was written at another world size.
    """

    epoch: int
    batch_in_epoch: int
    iteration: int
    remapped: bool = False


def resume_position(
    checkpoint: Mapping[str, Any],
    *,
    world_size: int,
    batch_size: int,
    iters_per_epoch: int,
    source: object = "checkpoint",
) -> ResumePosition:
    """Map the checkpoint's position to ``world_size`` processes of ``batch_size`` images
    with ``iters_per_epoch`` iterations per epoch (see the module docstring).

    Checkpoints without ``world_size`` (older ones) count as written at this world size.

    Raises:
        CheckpointError: a mid-epoch checkpoint whose images seen do not split into whole
            batches of the new world size (``source`` names it in the message).
    """
    epoch = int(checkpoint["epoch"])
    batch = int(checkpoint.get("batch_in_epoch", 0))
    iteration = int(checkpoint["iteration"])
    old_world = int(checkpoint.get("world_size", world_size))
    if old_world == world_size:
        return ResumePosition(epoch, batch, iteration)
    if batch == 0:
        return ResumePosition(epoch, 0, epoch * iters_per_epoch, remapped=True)

    old_batch = int(checkpoint.get("batch_size", batch_size))
    samples = int(checkpoint.get("samples_seen", batch * old_batch * old_world))
    per_step = batch_size * world_size
    new_batch, rest = divmod(samples, per_step)
    if old_batch != batch_size or rest or new_batch > iters_per_epoch:
        why = (
            f"its batch size per process was {old_batch}, now {batch_size}"
            if old_batch != batch_size
            else f"{samples} images are not a whole number of batches of {per_step}"
            if rest
            else f"epoch {epoch + 1} has only {iters_per_epoch} iterations here"
        )
        raise CheckpointError(
            f"{source}: written at world size {old_world} in the middle of epoch {epoch + 1} "
            f"at sample {samples}; it cannot be continued on {world_size} process(es) ({why}). "
            "Resume from an epoch checkpoint (epoch_NNNN) instead"
        )
    return ResumePosition(epoch, new_batch, epoch * iters_per_epoch + new_batch, remapped=True)
