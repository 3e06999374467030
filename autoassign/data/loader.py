"""Data loaders for training and evaluation, and the :class:`Batch` they yield.

Design for exact resume: the order, rank share and flips of every training batch are planned
in the main process by :class:`~autoassign.data.samplers.GroupedDistributedBatchSampler` as a
pure function of ``(seed, epoch, rank, world_size)``, and workers only execute the plan. So a
training loader can be built once and reused across epochs (its workers persist) by calling
``loader.batch_sampler.set_epoch(epoch)`` before each epoch, or built anew per epoch; both
give identical batches. To resume in the middle of epoch ``e`` after ``k`` batches, build it
with ``epoch=e, start_batch=k`` (or call ``set_epoch(e, start_batch=k)``): it yields exactly
the batches ``k, k+1, ...`` of the uninterrupted epoch, flips included. ``len(loader)`` is the
number of batches left in the current epoch; :func:`iterations_per_epoch` is the full count.

Images that cannot be used (truncated or corrupt files, a decoded size other than the
annotated one) never stop an epoch. In training, such an image is replaced by the next usable
one of its orientation group (the same replacement on every rank, epoch and worker count), so
every batch keeps its size and every rank its number of iterations, which DDP needs. In
evaluation it is run as a blank (black) image of its annotated size, so each image still has
its one place in a shard and its ground truth counts as missed. Either way the loader logs a
warning naming the file, once per file.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from autoassign.config import DataConfig, InputConfig
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.samplers import (
    GroupedDistributedBatchSampler,
    SampleKey,
    ShardedSequentialBatchSampler,
    full_batches_per_epoch,
    orientation_groups,
    resolve_rank,
)
from autoassign.data.transforms import (
    ImageLoadError,
    Sample,
    eval_sample,
    load_image,
    padded_size,
    resize_image,
    train_sample,
)

__all__ = [
    "Batch",
    "BatchCollator",
    "DetectionLoader",
    "DetectionImages",
    "build_eval_loader",
    "build_train_loader",
    "iterations_per_epoch",
    "load_image",
    "resize_image",
    "train_indices",
]

logger = logging.getLogger(__name__)

MAX_SUBSTITUTES = 16
"""Training images tried in place of one that cannot be used before the loader gives up
(so many unusable images in a row point at a missing folder, not at a few bad files)."""


@dataclass
class Batch:
    """A padded batch of images with their targets.

    Attributes:
        images: ``[B, 3, H, W]`` uint8 RGB, zero-padded at the bottom and right to multiples
            of the size divisor.
        image_sizes: ``(h, w)`` of each image after resize, before padding.
        targets: per image, ``"boxes"`` ``[N, 4]`` float32 xyxy in resized (and flipped)
            pixels, ``"labels"`` ``[N]`` int64.
        indices: index of each image in ``DetectionDataset.records``.
        original_sizes: ``(h, w)`` of the original images.
        flipped: whether each image was mirrored left-right.
        skipped: ``(file, warning)`` of each image that could not be used and was replaced
            (training) or blanked (evaluation) in this batch.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]]
    indices: list[int]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    flipped: list[bool] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def _map_tensors(self, fn) -> Batch:
        return Batch(
            images=fn(self.images),
            image_sizes=list(self.image_sizes),
            targets=[{key: fn(value) for key, value in target.items()} for target in self.targets],
            indices=list(self.indices),
            original_sizes=list(self.original_sizes),
            flipped=list(self.flipped),
            skipped=list(self.skipped),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory; ``DataLoader(pin_memory=True)`` calls this."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())


class BatchCollator:
    """Stack :class:`~autoassign.data.transforms.Sample` s into a :class:`Batch`, padding each
    image with zeros at the bottom and right to the batch's largest size rounded up to
    ``size_divisor``."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, samples: list[Sample]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        height, width = padded_size(
            max(sample.image_size[0] for sample in samples),
            max(sample.image_size[1] for sample in samples),
            self.size_divisor,
        )
        images = _empty_images((len(samples), 3, height, width))
        # Only the padding is zeroed: a full torch.zeros pass costs as much as the copies.
        for slot, sample in zip(images, samples):
            h, w = sample.image_size
            slot[:, :h, :w].copy_(sample.image)
            slot[:, h:, :].zero_()
            slot[:, :h, w:].zero_()
        return Batch(
            images=images,
            image_sizes=[sample.image_size for sample in samples],
            targets=[sample.target for sample in samples],
            indices=[sample.index for sample in samples],
            original_sizes=[sample.original_size for sample in samples],
            flipped=[sample.flipped for sample in samples],
            skipped=[skip for sample in samples for skip in sample.skipped],
        )


def _empty_images(shape: tuple[int, int, int, int]) -> Tensor:
    """Uninitialised uint8 tensor; in a loader worker, allocated straight in shared memory
    (as torch's default_collate does), so handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class PackedRecords:
    """The records pickled into one byte array, read back one at a time.

    Forked loader workers would otherwise copy, page by page, the parent's list of Python
    objects as soon as they touch its reference counts: for a large dataset, its whole size
    again in every worker. One NumPy buffer has no per-record reference counts to touch.
    """

    def __init__(self, records: list[ImageRecord]) -> None:
        blobs = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> ImageRecord:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(self._bytes[start : int(self._ends[index])].tobytes())


class DetectionImages(Dataset):
    """Map-style view of a :class:`DetectionDataset` keyed by :class:`SampleKey`: decodes,
    resizes and (in training, when the key says so) flips one record.

    An image that cannot be used is replaced (training) or blanked (evaluation), see the
    module docstring; ``substitute_groups`` are the record indices that may stand in for each
    other in training (the sampler's orientation groups), tried from the failing record on,
    in order, wrapping around.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        input_cfg: InputConfig,
        *,
        train: bool,
        substitute_groups: list[list[int]] | None = None,
    ):
        self.records = PackedRecords(dataset.records)
        self.min_size = input_cfg.min_size
        self.max_size = input_cfg.max_size
        self.train = train
        self._groups = [np.asarray(group, dtype=np.int64) for group in substitute_groups or []]
        # Record index -> its group and its position there (-1: in no group).
        self._group_of = np.full(len(self.records), -1, dtype=np.int64)
        self._position = np.zeros(len(self.records), dtype=np.int64)
        for number, group in enumerate(self._groups):
            self._group_of[group] = number
            self._position[group] = np.arange(len(group))
        self._unusable: dict[int, str] = {}  # record index -> why, met in this process

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> Sample:
        index, flip = key
        if not self.train:
            return self._eval_sample(index)
        skipped = []
        candidates = self._candidates(index)
        for candidate in candidates:
            record = self.records[candidate]
            reason = self._unusable.get(candidate)
            if reason is None:
                try:
                    sample = train_sample(
                        record, candidate, min_size=self.min_size, max_size=self.max_size, flip=flip
                    )
                except ImageLoadError as error:
                    reason = self._unusable[candidate] = _reason(error, record.path)
                else:
                    sample.skipped = tuple(skipped)
                    return sample
            skipped.append(
                (
                    str(record.path),
                    f"training image {record.path} skipped: {reason}; the next usable image "
                    "of its orientation group takes its place in batches",
                )
            )
        path = self.records[index].path
        if len(candidates) == 1:
            raise ImageLoadError(f"{path}: {reason}; no other training image may take its place")
        others = len(candidates) - 1
        raise ImageLoadError(
            f"{path} and the {others} training image{'s' if others > 1 else ''} tried in its "
            f"place cannot be used (the last: {reason}); is the image folder readable?"
        )

    def _candidates(self, index: int) -> list[int]:
        """``index``, then the records that may stand in for it, in the order tried."""
        number = int(self._group_of[index])
        if number < 0:
            return [index]
        group = self._groups[number]
        tried = min(len(group), 1 + MAX_SUBSTITUTES)
        positions = (int(self._position[index]) + np.arange(tried)) % len(group)
        return group[positions].tolist()

    def _eval_sample(self, index: int) -> Sample:
        record = self.records[index]
        try:
            return eval_sample(record, index, min_size=self.min_size, max_size=self.max_size)
        except ImageLoadError as error:
            reason = _reason(error, record.path)
        blank = torch.zeros((3, record.height, record.width), dtype=torch.uint8)
        sample = eval_sample(
            record, index, min_size=self.min_size, max_size=self.max_size, image=blank
        )
        sample.skipped = (
            (
                str(record.path),
                f"evaluation image {record.path} run as a blank image: {reason}; its ground "
                "truth counts as missed",
            ),
        )
        return sample


def _reason(error: ImageLoadError, path) -> str:
    """The error's message without the file name it starts with."""
    return str(error).removeprefix(f"{path}: ")


class DetectionLoader(DataLoader):
    """A ``DataLoader`` of :class:`Batch` es that logs, in the process iterating it, the
    warning of each image its workers could not use, once per file for the loader's life."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.warned_files: set[str] = set()

    def __iter__(self):
        for batch in super().__iter__():
            for path, warning in batch.skipped:
                if path not in self.warned_files:
                    self.warned_files.add(path)
                    logger.warning("%s", warning)
            yield batch


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: one thread per worker, and Python's and NumPy's global RNGs seeded
    from the worker's torch seed (the DataLoader derives it from its generator and
    ``worker_id``). The pipeline itself draws no random numbers in workers; this keeps any
    user code that does reproducible."""
    torch.set_num_threads(1)
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def train_indices(dataset: DetectionDataset, data_cfg: DataConfig) -> list[int]:
    """Record indices used for training: all, or only those with at least one non-ignored box
    when ``data_cfg.skip_empty_train_images``."""
    if not data_cfg.skip_empty_train_images:
        return list(range(len(dataset.records)))
    return [i for i, record in enumerate(dataset.records) if record.num_targets > 0]


def iterations_per_epoch(
    dataset: DetectionDataset, data_cfg: DataConfig, *, world_size: int = 1
) -> int:
    """Batches per rank per epoch: per orientation group (or all images when grouping is
    off), ``images // batch_size`` full batches; the total divided by ``world_size``, rounded
    down."""
    groups = orientation_groups(
        dataset.records, train_indices(dataset, data_cfg), grouping=data_cfg.aspect_ratio_grouping
    )
    return full_batches_per_epoch([len(g) for g in groups], data_cfg.batch_size, world_size)


def _loader_generator(*entropy: int) -> torch.Generator:
    seed_sequence = np.random.SeedSequence([value & (2**64 - 1) for value in entropy])
    return torch.Generator().manual_seed(int(seed_sequence.generate_state(1, np.uint64)[0]))


def build_train_loader(
    dataset: DetectionDataset,
    data_cfg: DataConfig,
    input_cfg: InputConfig,
    *,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> DetectionLoader:
    """The training loader of this rank, positioned at batch ``start_batch`` of ``epoch``.

    Yields :class:`Batch` es of ``data_cfg.batch_size`` images that share an orientation
    (when ``data_cfg.aspect_ratio_grouping``), flipped with ``data_cfg.flip_prob``. Workers
    (``data_cfg.num_workers``; 0 = in this process) persist across epochs; memory is pinned
    when CUDA is available. See the module docstring for epochs, resuming and images that
    cannot be used.

    Raises:
        ValueError: the dataset has too few images for one batch on every rank.
    """
    rank, world_size = resolve_rank(rank, world_size)
    groups = orientation_groups(
        dataset.records, train_indices(dataset, data_cfg), grouping=data_cfg.aspect_ratio_grouping
    )
    batch_sampler = GroupedDistributedBatchSampler(
        groups,
        data_cfg.batch_size,
        seed=seed,
        flip_prob=data_cfg.flip_prob,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        start_batch=start_batch,
    )
    if batch_sampler.batches_per_epoch == 0:
        sizes = " and ".join(str(len(group)) for group in groups) or "0"
        raise ValueError(
            f"{dataset.format} split {dataset.split!r}: {sizes} usable training images "
            f"(per orientation group) give no full batch of {data_cfg.batch_size} on each of "
            f"{world_size} ranks; lower data.batch_size or use more images"
        )
    return DetectionLoader(
        DetectionImages(dataset, input_cfg, train=True, substitute_groups=groups),
        batch_sampler=batch_sampler,
        collate_fn=BatchCollator(input_cfg.size_divisor),
        num_workers=data_cfg.num_workers,
        persistent_workers=data_cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=_loader_generator(seed, rank),
    )


def build_eval_loader(
    dataset: DetectionDataset,
    input_cfg: InputConfig,
    *,
    batch_size: int,
    num_workers: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> DetectionLoader:
    """The evaluation loader of this rank: its contiguous shard of the records, in order,
    resized and never flipped; each image is in exactly one rank's shard, once.

    Targets hold the records' boxes scaled to the resized image, unclipped; evaluators use
    ``Batch.indices`` to look up the original records instead.
    """
    rank, world_size = resolve_rank(rank, world_size)
    return DetectionLoader(
        DetectionImages(dataset, input_cfg, train=False),
        batch_sampler=ShardedSequentialBatchSampler(
            len(dataset.records), batch_size, rank=rank, world_size=world_size
        ),
        collate_fn=BatchCollator(input_cfg.size_divisor),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
    )
