"""Which images go in which batch, on which rank, in which order, and flipped or not.

The training plan of an epoch is a pure function of ``(seed, epoch, rank, world_size)`` and
the dataset's image sizes, computed in the main process:

1. Images are split by orientation (landscape ``w >= h`` / portrait), so that a batch never
   pads a tall image next to a wide one (one group when grouping is off).
2. Each group is shuffled and cut into full batches; a group's last incomplete batch is
   dropped. With the number of batches known from the group sizes alone, iterations per
   epoch are known before training starts (the learning-rate schedule needs them).
3. The list of batches is shuffled, and rank ``r`` takes batches ``r, r + W, r + 2W, ...``;
   the ``T mod W`` batches left over are dropped so that every rank runs the same number of
   iterations. Ranks therefore see disjoint images, and every rank computes the same plan.

Every sample carries its horizontal-flip decision, drawn from ``(seed, epoch, image index)``
alone, so flips do not depend on the number of loader workers, on the rank, or on where in
the epoch training resumed. Data-loader workers are stateless: they decode what the key says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from autoassign.data.records import ImageRecord

_UINT64 = (1 << 64) - 1
_FLIP_STREAM = 0x666C6970  # "flip": keeps flip draws independent of the order's stream


class SampleKey(NamedTuple):
    """What a loader worker needs to produce one sample: the record index and its flip."""

    index: int
    flip: bool


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's when it is
    initialised, else ``(0, 1)``. Never initialises torch.distributed."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def _rng(*entropy: int) -> np.random.Generator:
    # SeedSequence mixes all the integers, so (seed, epoch) = (0, 1) and (1, 0) give unrelated
    # streams; negative seeds are mapped to their two's complement.
    return np.random.default_rng(np.random.SeedSequence([value & _UINT64 for value in entropy]))


def flip_draws(seed: int, epoch: int, count: int) -> np.ndarray:
    """``[count]`` uniform draws in [0, 1); image ``i`` is flipped in ``epoch`` when draw ``i``
    is below the flip probability. Draw ``i`` does not depend on ``count`` (one stream, read
    from its start), so it is a function of ``(seed, epoch, i)`` alone."""
    return _rng(seed, epoch, _FLIP_STREAM).random(count)


def flip_decision(seed: int, epoch: int, index: int, prob: float) -> bool:
    """Whether image ``index`` is flipped in ``epoch`` (one draw of :func:`flip_draws`)."""
    return bool(flip_draws(seed, epoch, index + 1)[index] < prob)


def orientation_groups(
    records: Sequence[ImageRecord], indices: Sequence[int], *, grouping: bool
) -> list[list[int]]:
    """``indices`` split into ``[landscape (w >= h), portrait]``, empty groups removed; one
    group holding all of ``indices`` when ``grouping`` is False. Order within a group follows
    ``indices``."""
    if not grouping:
        return [list(indices)] if len(indices) else []
    landscape = [i for i in indices if records[i].width >= records[i].height]
    portrait = [i for i in indices if records[i].width < records[i].height]
    return [group for group in (landscape, portrait) if group]


def full_batches_per_epoch(group_sizes: Sequence[int], batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch: ``sum(n_g // batch_size) // world_size``."""
    return sum(size // batch_size for size in group_sizes) // world_size


class GroupedDistributedBatchSampler(Sampler[list[SampleKey]]):
    """Training batches of one rank, as lists of :class:`SampleKey` (see the module docstring).

    Args:
        groups: image indices per group; a batch never mixes groups.
        batch_size: images per batch on this rank.
        seed: the experiment seed; the epoch's order and flips derive from it.
        flip_prob: probability of a horizontal flip per image and epoch.
        rank, world_size: this process's place in data parallelism.
        epoch, start_batch: the epoch to produce, and the first of its batches to yield
            (resume mid-epoch); change both with :meth:`set_epoch`.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        batch_size: int,
        *,
        seed: int,
        flip_prob: float,
        rank: int,
        world_size: int,
        epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups = [np.asarray(group, dtype=np.int64) for group in groups]
        self.batch_size = batch_size
        self.seed = seed
        self.flip_prob = flip_prob
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batches_per_epoch = full_batches_per_epoch(
            [len(group) for group in self.groups], batch_size, self.world_size
        )
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(epoch, start_batch=start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Produce ``epoch`` next, starting at its batch ``start_batch`` (0 = from the start).

        Call before each epoch's ``iter(loader)``; a resumed epoch passes the number of
        batches already trained in it.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_epoch}] (batches per epoch on "
                f"this rank), got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_plan(self, epoch: int) -> list[list[SampleKey]]:
        """All of this rank's batches of ``epoch``, in order, whatever ``start_batch`` is."""
        rng = _rng(self.seed, epoch)
        batches: list[np.ndarray] = []
        for group in self.groups:
            shuffled = group[rng.permutation(len(group))]
            num_full = len(shuffled) // self.batch_size
            batches.extend(
                shuffled[: num_full * self.batch_size].reshape(num_full, self.batch_size)
            )
        order = rng.permutation(len(batches))
        used = self.batches_per_epoch * self.world_size
        mine = [batches[i] for i in order[self.rank : used : self.world_size]]
        num_indices = max((int(group.max()) + 1 for group in self.groups if len(group)), default=0)
        flips = flip_draws(self.seed, epoch, num_indices) < self.flip_prob
        return [
            [SampleKey(index, bool(flips[index])) for index in batch.tolist()] for batch in mine
        ]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        yield from self.epoch_plan(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        """Batches left to yield in the current epoch (all of them unless resuming)."""
        return self.batches_per_epoch - self.start_batch


class ShardedSequentialBatchSampler(Sampler[list[SampleKey]]):
    """Evaluation batches: rank ``r`` takes the ``r``-th contiguous shard of ``num_images``,
    in the original order, cut into batches (the last one may be smaller); never flipped.

    Shard sizes differ by at most one and no image is repeated to even them out, so every
    image is evaluated exactly once across ranks.
    """

    def __init__(self, num_images: int, batch_size: int, *, rank: int, world_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.start, self.stop = shard_bounds(num_images, self.rank, self.world_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for first in range(self.start, self.stop, self.batch_size):
            last = min(first + self.batch_size, self.stop)
            yield [SampleKey(index, False) for index in range(first, last)]

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


def shard_bounds(num_images: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous shard; the first ``num_images mod world_size``
    ranks get one image more."""
    base, extra = divmod(num_images, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
