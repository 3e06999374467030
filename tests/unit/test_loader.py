"""Batching, aspect-ratio grouping, distributed sharding, exact resume and worker invariance
of the train and eval loaders, over small JPEG files written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoassign.config import DataConfig, InputConfig
from autoassign.data.loader import (
    Batch,
    BatchCollator,
    build_eval_loader,
    build_train_loader,
    iterations_per_epoch,
)
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.samplers import flip_decision, resolve_rank, shard_bounds
from autoassign.data.transforms import Sample

INPUT = InputConfig(min_size=16, max_size=40, size_divisor=32)
NUM_LANDSCAPE, NUM_PORTRAIT = 14, 10


def _write_dataset(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> DetectionDataset:
    """One JPEG per ``(width, height)`` with two boxes each (one of them ignored on every
    fifth image) and labels cycling over three classes."""
    rng = np.random.default_rng(seed)
    records = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        boxes = np.array([[1, 2, width / 2, height - 1], [3, 1, width - 2, height / 3]], np.float32)
        records.append(
            ImageRecord(
                file_name=path.name,
                path=path,
                width=width,
                height=height,
                boxes=boxes,
                labels=np.array([index % 3, (index + 1) % 3], dtype=np.int64),
                ignore=np.array([False, index % 5 == 0]),
                image_id=index,
            )
        )
    return DetectionDataset("coco", "train", records, ["a", "b", "c"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DetectionDataset:
    """14 landscape images of varying width and 10 portrait ones, interleaved."""
    landscape = [(20 + i % 4 * 3, 14 + i % 3) for i in range(NUM_LANDSCAPE)]
    portrait = [(14 + i % 3, 20 + i % 4 * 3) for i in range(NUM_PORTRAIT)]
    sizes = []
    for i in range(max(NUM_LANDSCAPE, NUM_PORTRAIT)):
        sizes += landscape[i : i + 1] + portrait[i : i + 1]
    return _write_dataset(tmp_path_factory.mktemp("images"), sizes)


def _data_cfg(**overrides) -> DataConfig:
    settings = {"batch_size": 2, "num_workers": 0, "flip_prob": 0.5}
    settings.update(overrides)
    return DataConfig(**settings)


def _is_landscape(dataset: DetectionDataset, index: int) -> bool:
    return dataset.records[index].width >= dataset.records[index].height


def _plan(loader) -> list[list[tuple[int, bool]]]:
    return [[(key.index, key.flip) for key in batch] for batch in loader.batch_sampler]


def _assert_batches_equal(first: list[Batch], second: list[Batch]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.indices == b.indices
        assert a.flipped == b.flipped
        assert a.image_sizes == b.image_sizes and a.original_sizes == b.original_sizes
        assert torch.equal(a.images, b.images)
        for target_a, target_b in zip(a.targets, b.targets):
            assert target_a.keys() == target_b.keys()
            for key in target_a:
                assert torch.equal(target_a[key], target_b[key])


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def test_collate_pads_bottom_right_with_zeros_to_multiples_of_32():
    images = [
        torch.randint(1, 256, (3, 33, 40), dtype=torch.uint8),
        torch.randint(1, 256, (3, 20, 70), dtype=torch.uint8),
    ]
    targets = [
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([5])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    samples = [
        Sample(images[0], targets[0], index=4, original_size=(66, 80), flipped=True),
        Sample(images[1], targets[1], index=9, original_size=(20, 70), flipped=False),
    ]

    batch = BatchCollator(32)(samples)

    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(33, 40), (20, 70)]
    assert batch.original_sizes == [(66, 80), (20, 70)]
    assert batch.indices == [4, 9] and batch.flipped == [True, False] and len(batch) == 2
    for slot, image in zip(batch.images, images):
        h, w = image.shape[-2:]
        assert torch.equal(slot[:, :h, :w], image)
        assert int(slot[:, h:, :].count_nonzero()) == 0
        assert int(slot[:, :, w:].count_nonzero()) == 0
    assert batch.targets[0]["labels"].tolist() == [5]

    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.indices == batch.indices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and CUDA need a GPU")
def test_batch_pin_memory_and_to_cuda():
    image = torch.ones((3, 32, 32), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1])}
    batch = BatchCollator(32)([Sample(image, target, 0, (32, 32), False)])

    pinned = batch.pin_memory()
    on_gpu = pinned.to("cuda", non_blocking=True)

    assert pinned.images.is_pinned() and pinned.targets[0]["boxes"].is_pinned()
    assert on_gpu.images.is_cuda and on_gpu.targets[0]["labels"].is_cuda
    assert torch.equal(on_gpu.images.cpu(), batch.images)


# --------------------------------------------------------------------------------------------
# Train loader
# --------------------------------------------------------------------------------------------


def test_train_batches_are_padded_grouped_and_match_the_records(dataset):
    loader = build_train_loader(dataset, _data_cfg(), INPUT, seed=3)

    batches = list(loader)

    assert len(batches) == len(loader) == (NUM_LANDSCAPE + NUM_PORTRAIT) // 2
    for batch in batches:
        orientations = {_is_landscape(dataset, index) for index in batch.indices}
        assert len(orientations) == 1, f"batch mixes orientations: {batch.indices}"
        landscape = orientations.pop()
        max_h = max(h for h, _ in batch.image_sizes)
        max_w = max(w for _, w in batch.image_sizes)
        assert batch.images.shape[-2:] == (-(-max_h // 32) * 32, -(-max_w // 32) * 32)
        for index, (h, w), (orig_h, orig_w) in zip(
            batch.indices, batch.image_sizes, batch.original_sizes
        ):
            record = dataset.records[index]
            assert (orig_h, orig_w) == (record.height, record.width)
            assert min(h, w) == 16 and (h <= w) == landscape
    seen = sorted(index for batch in batches for index in batch.indices)
    assert seen == list(range(len(dataset)))  # 14 and 10 are even: nothing dropped


def test_train_targets_follow_flip_and_ignore(dataset):
    loader = build_train_loader(dataset, _data_cfg(flip_prob=0.5), INPUT, seed=0)

    batches = list(loader)

    flips = [flag for batch in batches for flag in batch.flipped]
    assert 0 < sum(flips) < len(flips)
    for batch in batches:
        for index, flipped, target, (h, w) in zip(
            batch.indices, batch.flipped, batch.targets, batch.image_sizes
        ):
            record = dataset.records[index]
            sx, sy = w / record.width, h / record.height
            x1, y1, x2, y2 = record.boxes[0]
            expected = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
            if flipped:
                expected = [w - x2 * sx, y1 * sy, w - x1 * sx, y2 * sy]
            torch.testing.assert_close(target["boxes"][0], torch.tensor(expected))
            assert target["labels"][0] == record.labels[0]
            assert len(target["boxes"]) == 2 - int(record.ignore.sum())


def test_flip_prob_zero_and_one(dataset):
    never = build_train_loader(dataset, _data_cfg(flip_prob=0.0), INPUT, seed=0)
    always = build_train_loader(dataset, _data_cfg(flip_prob=1.0), INPUT, seed=0)

    assert not any(flip for batch in _plan(never) for _, flip in batch)
    assert all(flip for batch in _plan(always) for _, flip in batch)


def test_iterations_per_epoch_drops_incomplete_batches_per_group(dataset):
    # Batches of 4: landscape 14 -> 3, portrait 10 -> 2.
    grouped = _data_cfg(batch_size=4)
    assert iterations_per_epoch(dataset, grouped) == 5
    assert iterations_per_epoch(dataset, grouped, world_size=2) == 2
    assert iterations_per_epoch(dataset, _data_cfg(batch_size=4, aspect_ratio_grouping=False)) == 6

    loader = build_train_loader(dataset, grouped, INPUT, seed=1, rank=1, world_size=2)
    assert len(loader) == 2 and len(list(loader.batch_sampler)) == 2


def test_ranks_get_disjoint_equal_shares_of_one_shared_order(dataset):
    data_cfg = _data_cfg(batch_size=2)  # 7 + 5 = 12 batches: 4 per rank of 3
    full = _plan(build_train_loader(dataset, data_cfg, INPUT, seed=5, world_size=1, rank=0))
    per_rank = [
        _plan(build_train_loader(dataset, data_cfg, INPUT, seed=5, world_size=3, rank=rank))
        for rank in range(3)
    ]

    assert [len(plan) for plan in per_rank] == [4, 4, 4]
    indices = [{i for batch in plan for i, _ in batch} for plan in per_rank]
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    assert indices[0] | indices[1] | indices[2] == set(range(len(dataset)))
    # Every rank cut its share from the same shuffled list of batches, with the same flips.
    interleaved = [per_rank[step % 3][step // 3] for step in range(12)]
    assert interleaved == full


def test_uneven_batch_count_is_dropped_so_ranks_stay_equal(dataset):
    data_cfg = _data_cfg(batch_size=2)  # 12 batches over 5 ranks: 2 each, 2 dropped
    plans = [
        _plan(build_train_loader(dataset, data_cfg, INPUT, seed=0, world_size=5, rank=rank))
        for rank in range(5)
    ]
    assert [len(plan) for plan in plans] == [2] * 5
    used = [i for plan in plans for batch in plan for i, _ in batch]
    assert len(used) == len(set(used)) == 20


def test_order_is_a_function_of_seed_and_epoch(dataset):
    def plan(seed, epoch):
        loader = build_train_loader(dataset, _data_cfg(), INPUT, seed=seed, epoch=epoch)
        return _plan(loader)

    assert plan(0, 0) == plan(0, 0)
    assert plan(0, 0) != plan(0, 1)
    assert plan(0, 0) != plan(1, 0)
    assert plan(0, 1) != plan(1, 0)  # not seeded by seed + epoch alone

    reused = build_train_loader(dataset, _data_cfg(), INPUT, seed=0)
    reused.batch_sampler.set_epoch(1)
    assert _plan(reused) == plan(0, 1)


def test_flip_of_an_image_depends_on_seed_epoch_and_index_only(dataset):
    data_cfg = _data_cfg(flip_prob=0.5)
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            loader = build_train_loader(
                dataset, data_cfg, INPUT, seed=9, epoch=2, rank=rank, world_size=world_size
            )
            for batch in _plan(loader):
                for index, flip in batch:
                    assert flip == flip_decision(9, 2, index, 0.5)


def test_start_batch_resumes_with_the_tail_of_the_full_epoch(dataset):
    data_cfg = _data_cfg(batch_size=2)
    full = list(build_train_loader(dataset, data_cfg, INPUT, seed=4, epoch=3))

    resumed_loader = build_train_loader(dataset, data_cfg, INPUT, seed=4, epoch=3, start_batch=7)
    assert len(resumed_loader) == len(full) - 7
    _assert_batches_equal(list(resumed_loader), full[7:])

    reused = build_train_loader(dataset, data_cfg, INPUT, seed=4, epoch=0)
    reused.batch_sampler.set_epoch(3, start_batch=10)
    _assert_batches_equal(list(reused), full[10:])
    reused.batch_sampler.set_epoch(4)
    assert len(reused) == len(full)

    with pytest.raises(ValueError, match="start_batch"):
        reused.batch_sampler.set_epoch(3, start_batch=len(full) + 1)


def test_two_workers_give_the_same_batches_as_none(dataset):
    data_cfg = _data_cfg(batch_size=4)
    in_process = build_train_loader(dataset, data_cfg, INPUT, seed=2, epoch=0)
    workers = build_train_loader(
        dataset, data_cfg.model_copy(update={"num_workers": 2}), INPUT, seed=2, epoch=0
    )
    assert workers.persistent_workers and workers.num_workers == 2
    try:
        _assert_batches_equal(list(workers), list(in_process))
        # The persistent workers follow the sampler into the next epoch.
        in_process.batch_sampler.set_epoch(1, start_batch=1)
        workers.batch_sampler.set_epoch(1, start_batch=1)
        _assert_batches_equal(list(workers), list(in_process))
    finally:
        del workers


def test_skip_empty_train_images(tmp_path):
    dataset = _write_dataset(tmp_path, [(20, 16)] * 6)
    dataset.records[0].ignore[:] = True  # only ignored boxes: no target
    dataset.records[1].boxes = np.zeros((0, 4), np.float32)
    dataset.records[1].labels = np.zeros(0, np.int64)
    dataset.records[1].ignore = np.zeros(0, bool)

    skipping = build_train_loader(dataset, _data_cfg(batch_size=1), INPUT, seed=0)
    keeping = _data_cfg(batch_size=1, skip_empty_train_images=False)

    assert sorted(i for batch in _plan(skipping) for i, _ in batch) == [2, 3, 4, 5]
    assert iterations_per_epoch(dataset, _data_cfg(batch_size=1)) == 4
    assert iterations_per_epoch(dataset, keeping) == 6
    empty = next(b for b in build_train_loader(dataset, keeping, INPUT, seed=0) if 1 in b.indices)
    assert empty.targets[0]["boxes"].shape == (0, 4)


def test_a_group_smaller_than_a_batch_is_left_out(tmp_path):
    dataset = _write_dataset(tmp_path, [(20, 16)] * 5 + [(16, 20)])

    loader = build_train_loader(dataset, _data_cfg(batch_size=2), INPUT, seed=0)

    assert len(loader) == iterations_per_epoch(dataset, _data_cfg(batch_size=2)) == 2
    used = [index for batch in loader for index in batch.indices]
    assert len(used) == 4 and 5 not in used


def test_too_small_a_dataset_is_a_clear_error(tmp_path):
    dataset = _write_dataset(tmp_path, [(20, 16), (16, 20)])
    with pytest.raises(ValueError, match="no full batch of 2 on each of 1 ranks"):
        build_train_loader(dataset, _data_cfg(batch_size=2), INPUT, seed=0)


def test_rank_defaults_and_validation():
    assert resolve_rank(None, None) == (0, 1)
    assert resolve_rank(2, 4) == (2, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        resolve_rank(4, 4)


# --------------------------------------------------------------------------------------------
# Eval loader
# --------------------------------------------------------------------------------------------


def test_shard_bounds_are_contiguous_and_cover_once():
    assert [shard_bounds(10, rank, 3) for rank in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(2, rank, 3) for rank in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_eval_loader_covers_each_image_once_in_order_unflipped(dataset):
    shards = []
    for rank in range(3):
        loader = build_eval_loader(
            dataset, INPUT, batch_size=3, num_workers=0, rank=rank, world_size=3
        )
        batches = list(loader)
        assert len(loader) == len(batches)
        assert not any(flag for batch in batches for flag in batch.flipped)
        shards.append([index for batch in batches for index in batch.indices])

    assert shards == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    first = next(iter(build_eval_loader(dataset, INPUT, batch_size=5, num_workers=0)))
    record = dataset.records[0]
    h, w = first.image_sizes[0]
    sx, sy = w / record.width, h / record.height
    expected = torch.from_numpy(record.boxes[~record.ignore]) * torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(first.targets[0]["boxes"], expected)


def test_eval_loader_keeps_the_last_partial_batch(dataset):
    loader = build_eval_loader(dataset, INPUT, batch_size=5, num_workers=0)
    sizes = [len(batch) for batch in loader]
    assert sizes == [5, 5, 5, 5, 4]


# --------------------------------------------------------------------------------------------
# With the project's dataset readers
# --------------------------------------------------------------------------------------------


def test_loaders_over_a_synthetic_coco_split(tmp_path):
    from autoassign.data import build_dataset
    from autoassign.data.synthetic import write_synthetic

    write_synthetic(
        "coco", tmp_path, num_images=6, num_classes=3, image_size=(96, 64), seed=1, splits=["train"]
    )
    data_cfg = _data_cfg(root=tmp_path, batch_size=2, num_workers=0, flip_prob=0.0)
    dataset = build_dataset(data_cfg, "train")
    input_cfg = InputConfig(min_size=32, max_size=64, size_divisor=32)

    batches = list(build_train_loader(dataset, data_cfg, input_cfg, seed=0))
    evaluated = list(build_eval_loader(dataset, input_cfg, batch_size=4, num_workers=0))

    assert len(batches) == iterations_per_epoch(dataset, data_cfg) == len(dataset) // 2
    for batch in batches:
        assert batch.images.shape[1:] == (3, 32, 64)  # 96x64 -> 48x32, padded to 64x32
        assert batch.image_sizes == [(32, 48)] * len(batch)
        for index, target in zip(batch.indices, batch.targets):
            record = dataset.records[index]
            kept = ~record.ignore
            expected = torch.from_numpy(record.boxes[kept]) / 2  # scale 0.5 on both axes
            torch.testing.assert_close(target["boxes"], expected)
            assert target["labels"].tolist() == record.labels[kept].tolist()
    assert [i for batch in evaluated for i in batch.indices] == list(range(len(dataset)))
